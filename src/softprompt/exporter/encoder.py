"""Encoders (BERT, RoBERTa, MiniLM and the like): a graph from `inputs_embeds` to the last hidden state.

The word-embedding lookup is the only part left outside the graph (the runtime does it from
`embeddings.npy`); position embeddings, token-type embeddings and the embedding LayerNorm stay
inside, so they apply to the prompt rows as to the tokens, exactly as PEFT's prompt tuning of a
feature-extraction model does. The prompt therefore counts against the model's positions.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError
from .graph import onnx_export
from .metadata import max_positions
from .validate import passed, relative_diff

# Model types loaded with AutoModel (no language-model head) and exported as encoders.
ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "electra",
    "mpnet",
    "deberta",
    "deberta-v2",
    "camembert",
    "albert",
    "modernbert",
    "nomic_bert",
}


def is_encoder(config) -> bool:
    """An encoder-only model: a known encoder type that is not set up as a decoder."""
    return config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False)


class EncoderModule(torch.nn.Module):
    """inputs_embeds [B, T, E], attention_mask [B, T] (, token_type_ids [B, T]) -> last_hidden_state [B, T, E]
    (, pooler_output [B, E]).

    BERT's pooler (dense + tanh of the first position) is kept as a second output where the model
    has one: a sequence classifier trained with PEFT's prompt tuning reads it, and under a prompt the
    first position is the first prompt row.
    """

    def __init__(self, model, token_types: bool):
        super().__init__()
        self.model = model
        self.token_types = token_types
        self.pooler = getattr(model, "pooler", None) is not None

    @property
    def output_names(self) -> list[str]:
        return ["last_hidden_state", "pooler_output"] if self.pooler else ["last_hidden_state"]

    def forward(self, inputs_embeds, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if self.token_types else {}
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return (out.last_hidden_state, out.pooler_output) if self.pooler else out.last_hidden_state


POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


def sentence_pooling(folder: Path | None) -> str:
    """How the model pools a sentence embedding: its sentence-transformers Pooling module says, else "mean".

    Under a prompt each mode covers the text's tokens only: "cls" is the text's first token
    ([CLS]), "lasttoken" its last, "mean" and "max" run over its tokens.
    """
    modules = folder / "modules.json" if folder is not None else None
    if modules is None or not modules.is_file():
        return "mean"
    try:
        entries = json.loads(modules.read_text())
        entry = next((m for m in entries if str(m.get("type", "")).endswith(".Pooling")), None)
        if entry is None:
            return "mean"
        config = json.loads((folder / entry.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ExportError(f"{modules}: cannot read the sentence-transformers pooling settings ({exc})") from None
    chosen = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    others = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in POOLING_MODES)
    if len(chosen) != 1 or others:
        raise ExportError(
            f"{folder}: sentence-transformers pooling {sorted(k for k, v in config.items() if k.startswith('pooling_mode') and v)}; "
            f"the runtime pools by exactly one of {sorted(POOLING_MODES)}"
        )
    return chosen[0]


def sentence_max_length(folder: Path | None) -> int | None:
    """The token count sentence-transformers cuts texts to (`max_seq_length` in sentence_bert_config.json), or None."""
    path = folder / "sentence_bert_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError) as exc:
        raise ExportError(f"{path}: cannot read max_seq_length ({exc})") from None
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ExportError(f"{path}: max_seq_length {value!r}; expected a whole number of tokens, at least 2")
    return value


def uses_token_types(model) -> bool:
    """The model has token-type embeddings and its forward takes them (read from the signature: transformers 5
    wraps forward in decorators, so the code object's names are the wrapper's)."""
    takes = "token_type_ids" in inspect.signature(model.forward).parameters
    return int(getattr(model.config, "type_vocab_size", 0) or 0) > 0 and takes


def export_encoder_graph(graph: EncoderModule, hidden: int, path: Path, opset: int, external_data: bool) -> None:
    """Export with dynamic batch and sequence (token_type_ids only where the model reads them)."""
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("sequence")
    example = (torch.randn(2, 5, hidden) * 0.02, torch.ones(2, 5, dtype=torch.long))
    names = ["inputs_embeds", "attention_mask"]
    dynamic: dict = {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    if graph.token_types:
        example += (torch.zeros(2, 5, dtype=torch.long),)
        names.append("token_type_ids")
        dynamic["token_type_ids"] = {0: batch, 1: seq}
    onnx_export(graph, example, path, opset, external_data, dynamic, names, graph.output_names, what=type(graph.model).__name__)


def validation_feeds(table: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Three rows of random tokens, two of them right-padded; and the mask of the positions that are not padding."""
    rng = np.random.default_rng(0)
    embeds = table[rng.integers(0, table.shape[0], (3, 7))].astype(np.float32)
    mask = np.ones((3, 7), dtype=np.int64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return {"inputs_embeds": embeds, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}, mask.astype(bool)


def validate_encoder(path: Path, graph: EncoderModule, table: np.ndarray, tolerance: float) -> dict:
    """ONNX against PyTorch on right-padded rows; padded positions are not compared."""
    import onnxruntime as ort

    feeds, keep = validation_feeds(table)
    if not graph.token_types:
        del feeds["token_type_ids"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(graph.output_names, feeds)
    with torch.no_grad():
        want = graph(*(torch.from_numpy(v) for v in feeds.values()))
    want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
    diffs = {"last_hidden_state, padded rows": relative_diff(got[0][keep], want[0][keep])}
    if graph.pooler:
        diffs["pooler_output"] = relative_diff(got[1], want[1])
    return passed(diffs, tolerance)


def encoder_facts(model, table: np.ndarray) -> dict:
    config = model.config
    heads = int(config.num_attention_heads)
    return {
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "hidden_size": int(table.shape[1]),
        "vocab_size": int(table.shape[0]),
        "num_layers": int(config.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": heads,
        "head_size": int(config.hidden_size) // heads,
        "max_positions": max_positions(config),
    }


def encoder_tokens(tokenizer) -> dict:
    """Special tokens an encoder's runtime needs: [CLS]/[SEP] come from the tokenizer's own template."""
    return {
        "bos_token_id": tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,
        "eos_token_ids": [t for t in (tokenizer.sep_token_id,) if t is not None],
        "pad_token_id": tokenizer.pad_token_id,
    }


# Text for `calibration_feeds`: plain sentences, questions, numbers, code, shouting and another language,
# so that the activations' ranges are those of real input (random rows of the table are much tamer).
CALIBRATION_TEXTS = (
    "A man is playing a guitar on the street corner.",
    "What is the capital of France, and how many people live there?",
    "The new phone has a brilliant screen but a weak battery!!!",
    "Invoice #4471: 3 x widgets at $19.99, due 2024-07-01.",
    "def add(x, y): return x + y  # sums two numbers",
    "Ugh. Worst. Service. EVER. Never coming back :(",
    "La vie est belle en été, surtout au bord de la mer.",
    "Heavy rain is expected across the north tomorrow, with flooding likely near rivers.",
)


def calibration_feeds(tokenizer, table: np.ndarray, positions: int | None, prompt_length: int = 20, seed: int = 0):
    """Inputs an encoder graph sees in service: a soft prompt (rows of the table) before each text, right-padded
    to at most `positions` (the model's). With them, the validation's own inputs, which a quantized graph must pass.

    Returns (feeds, a [B, T] mask of the positions that are not padding) for each.
    """
    rng = np.random.default_rng(seed)
    if positions:
        prompt_length = min(prompt_length, positions // 4)
    prompt = table[rng.integers(0, table.shape[0], prompt_length)]
    room = positions - prompt_length if positions else None
    ids = [tokenizer(text)["input_ids"][:room] for text in CALIBRATION_TEXTS]
    width = prompt_length + max(len(row) for row in ids)
    embeds = np.zeros((len(ids), width, table.shape[1]), np.float32)
    mask = np.zeros((len(ids), width), np.int64)
    for i, row in enumerate(ids):
        embeds[i, :prompt_length] = prompt
        embeds[i, prompt_length : prompt_length + len(row)] = table[row]
        mask[i, : prompt_length + len(row)] = 1
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
    return [(feeds, mask.astype(bool)), validation_feeds(table)]
