"""A GGUF file's own tokenizer as a `tokenizers` tokenizer: what llama.cpp tokenizes with that file.

transformers builds a GGUF model's tokenizer from the model's architecture, not from what the file
says: for Gemma 3 (a SentencePiece BPE vocabulary, `tokenizer.ggml.model = llama`) it builds a
Unigram model from scores that are merge ranks, which splits "capital" into "c/ap/it/al", and the
model reads garbage. Here the file decides, as llama.cpp (llama-vocab.cpp) reads it:

- `llama`, SentencePiece BPE (llama.cpp's SPM tokenizer): the symbols are characters, and the
  adjacent pair whose joined text is the highest-scoring token merges first. As a `tokenizers` BPE,
  every split of every token into two tokens is a merge, ranked by the joined token's score;
  characters outside the vocabulary fall back to byte tokens; spaces are "▁", with one added before
  the text (and after each special token) where `add_space_prefix` says.
- `gpt2`, byte-level BPE: the file's merges, after the pre-tokenizer regexes llama.cpp uses for the
  file's `tokenizer.ggml.pre`.
- anything else (an unknown pre-tokenizer, WordPiece, Unigram, RWKV): None, and the caller keeps
  transformers' conversion with a warning.

Control tokens (type 3) become special added tokens and user-defined ones (type 4) added tokens
matched whole, as llama.cpp partitions both out of the text before tokenizing the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's pre-tokenizers (llm_tokenizer_bpe): `tokenizer.ggml.pre` -> (regexes applied in turn, ignore_merges, add_bos)
_DEFAULT = ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], False, False)
PRE_TOKENIZERS: dict[str, tuple[list[str], bool, bool]] = {
    "default": _DEFAULT,
    **{name: ([_LLAMA3], True, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral")},
    **{name: ([_GPT2], False, False) for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais")},
    **{name: ([_QWEN2], False, False) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan")},
    **{
        name: ([r"\p{N}", _GPT2], False, False)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
    },
}


def gguf_fields(path) -> dict[str, Any]:
    """The file's `tokenizer.*` values (token lists as Python lists)."""
    from gguf import GGUFReader

    return {key: field.contents() for key, field in GGUFReader(str(path)).fields.items() if key.startswith("tokenizer.")}


def gguf_tokenizer(fields: dict[str, Any]):
    """The `tokenizers.Tokenizer` llama.cpp's reading of these `tokenizer.ggml.*` fields amounts to, and its
    add_bos; None (with the reason) where this exporter does not know the file's tokenizer kind."""
    kind = fields.get("tokenizer.ggml.model")
    tokens: list[str] = list(fields.get("tokenizer.ggml.tokens") or [])
    types: list[int] = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if not tokens or len(types) != len(tokens):
        return None, "the file has no token list (tokenizer.ggml.tokens) with a type for each token"
    if kind == "llama":
        scores = list(fields.get("tokenizer.ggml.scores") or [])
        if len(scores) != len(tokens):
            return None, "a SentencePiece vocabulary without a score for each token"
        prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer = _spm(tokens, scores, fields.get("tokenizer.ggml.unknown_token_id"), prefix)
        add_bos = fields.get("tokenizer.ggml.add_bos_token", True)
    elif kind == "gpt2":
        pre = fields.get("tokenizer.ggml.pre") or "default"
        if pre not in PRE_TOKENIZERS:
            return None, f"its pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one this exporter knows"
        merges = fields.get("tokenizer.ggml.merges")
        if not merges:
            return None, "a byte-level BPE vocabulary without merges"
        regexes, ignore_merges, default_bos = PRE_TOKENIZERS[pre]
        tokenizer = _byte_level(tokens, list(merges), regexes, ignore_merges)
        add_bos = fields.get("tokenizer.ggml.add_bos_token", default_bos)
    else:
        return None, f"its tokenizer kind {kind!r} (tokenizer.ggml.model) is not one this exporter builds"
    _added(tokenizer, tokens, types)
    bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
    _post_processor(
        tokenizer,
        tokens[bos] if add_bos and bos is not None else None,
        tokens[eos] if fields.get("tokenizer.ggml.add_eos_token") and eos is not None else None,
    )
    return tokenizer, None


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, the joined token's score first (ties: its id), as llama.cpp's SPM
    tokenizer merges the adjacent pair whose joined text scores highest."""
    ids = _ids(tokens)
    found = []
    for token, i in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                found.append((-scores[i], i, cut, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _ids(tokens: Sequence[str]) -> dict[str, int]:
    """Each token text's id; a text listed twice keeps its first id, as llama.cpp's `text_to_token` does."""
    ids: dict[str, int] = {}
    for i, token in enumerate(tokens):
        ids.setdefault(token, i)
    return ids


def _spm(tokens: list[str], scores: list[float], unk_id: int | None, add_space_prefix: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = _ids(tokens)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab, spm_merges(tokens, scores), unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence([*decode, *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
    return tokenizer


def _byte_level(tokens: list[str], merges: list[str], regexes: list[str], ignore_merges: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = _ids(tokens)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _added(tokenizer, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == CONTROL and t]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == USER_DEFINED and t]
    )


def _post_processor(tokenizer, bos: str | None, eos: str | None) -> None:
    from tokenizers import processors

    if bos is None and eos is None:
        return
    single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
    pair = " ".join([single, *([bos] if bos else []), "$B", *([eos] if eos else [])])
    special = [(token, tokenizer.token_to_id(token)) for token in dict.fromkeys(t for t in (bos, eos) if t)]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
