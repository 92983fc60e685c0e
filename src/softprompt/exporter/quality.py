"""What a quantized decoder export costs in the numbers users compare: KL divergence to fp32's next-token distribution,
top-1 agreement and the change in perplexity, on real text, teacher-forced.

A max-logit threshold judges one outlier in one of 49,152+ logits; it refused int4 of models that
write what fp32 writes (Gemma-3 and Qwen2.5 moved their logits by 0.53 and 0.36 of the scale).
These measures judge the distribution the model samples from, position by position, over text it
is meant to read. An export is refused only when it is broken: non-finite logits, or a mean KL or a
perplexity ratio no working quantization of a model comes near (`BROKEN`); a tiny random model
whose distributions are close to uniform passes, as it should (its KL is near 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import ExportValidationError
from .validate import Reference, cpu_session, graph_feeds, whole_text

# Sample text, each read whole as the runtime serves it (the tokenizer's special tokens included): prose, a question,
# a list, code and numbers, so the measure covers what prompts and chat turns feed a model.
QUALITY_TEXTS = (
    "The capital of France is Paris, a city on the Seine known for its museums, its cafes and the Eiffel Tower, "
    "which was built for the world's fair of 1889.",
    "Once upon a time, a little robot lived in a quiet village by the sea. Every morning it walked to the harbour "
    "to watch the fishing boats come home.",
    "Q: What is the boiling point of water at sea level?\nA: Water boils at 100 degrees Celsius, or 212 degrees "
    "Fahrenheit, at sea level.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "To make a cup of tea, boil fresh water, warm the pot, add one spoon of leaves per cup and let it steep for "
    "three to five minutes before pouring.",
    "The film was slow and far too long, but the acting was wonderful and the last scene moved me to tears.",
)
# Refused above these: a mean KL of 1 nat, or perplexity doubled. Measured on real models (docs/QUALITY.md): int8 and
# int4 recipes that keep their tasks stay below 0.1 nat and +15% perplexity; the worst recipe measured, 0.3 nat.
BROKEN = {"kl_mean": 1.0, "perplexity_ratio": 2.0}


@dataclasses.dataclass(frozen=True)
class Quality:
    """The graph against PyTorch fp32 over `positions` next-token predictions of the sample text."""

    kl_mean: float  # nats, mean over positions of KL(fp32 || graph)
    kl_max: float
    top1_agreement: float  # share of positions whose most likely token is fp32's
    perplexity_fp32: float  # of the sample text's own next tokens
    perplexity: float
    positions: int

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.perplexity_fp32

    def record(self) -> dict:
        return {
            **{k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()},
            "perplexity_ratio": round(self.perplexity_ratio, 6),
        }

    def summary(self) -> str:
        return (
            f"KL to fp32 {self.kl_mean:.4f} nats (max {self.kl_max:.3f}), top-1 agreement {self.top1_agreement:.1%}, "
            f"perplexity {self.perplexity_fp32:.2f} -> {self.perplexity:.2f} ({self.perplexity_ratio - 1:+.1%}), "
            f"over {self.positions} positions of sample text"
        )


POSITIONS_AT_ONCE = 16  # rows of logits turned into float64 distributions at once: 16 x 262,144 x 8 bytes is 34 MB


def compare(reference: Iterable[np.ndarray], got: Iterable[np.ndarray], ids: Sequence[Sequence[int]]) -> Quality:
    """The measures for logits [T, V] of each text (`ids`, the text's own tokens) from fp32 and from the graph.

    `got` may be made as it is read (one text's logits at a time), and each text is measured POSITIONS_AT_ONCE
    positions at a time: in float64 a large vocabulary's distributions for a whole text are 0.2 GB per array."""
    kls, agree, nll_ref, nll_got = [], [], [], []
    for want, have, row in zip(reference, got, ids):
        for name, logits in (("PyTorch fp32", want), ("the graph", have)):
            if not np.isfinite(logits).all():
                raise ExportValidationError(f"{name} gives non-finite logits on the sample text")
        following = np.asarray(row[1:], dtype=np.int64)  # position t predicts token t + 1
        for start in range(0, len(want), POSITIONS_AT_ONCE):
            part = slice(start, start + POSITIONS_AT_ONCE)
            p, q = _log_softmax(want[part]), _log_softmax(have[part])
            kls.append((np.exp(p) * (p - q)).sum(-1))
            agree.append(want[part].argmax(-1) == have[part].argmax(-1))
            at = np.arange(len(p))[: max(0, len(following) - start)]
            nll_ref.append(-p[at, following[start + at]])
            nll_got.append(-q[at, following[start + at]])
    kl = np.concatenate(kls)
    return Quality(
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        top1_agreement=float(np.concatenate(agree).mean()),
        perplexity_fp32=float(np.exp(np.concatenate(nll_ref).mean())),
        perplexity=float(np.exp(np.concatenate(nll_got).mean())),
        positions=int(kl.size),
    )


def measure(graph: Path | ort.InferenceSession, want: Reference) -> Quality:
    """Each of `want.rows` read whole by the graph (a path or its CPU session), against PyTorch fp32's logits, no cache;
    one text's logits at a time."""
    session = cpu_session(graph)
    inputs = {i.name for i in session.get_inputs()}
    got = (
        session.run(["logits"], graph_feeds(whole_text(ids, want.table, want.layout), want.layout, inputs, keep=0))[0][0]
        for ids in want.rows
    )
    return compare(want.logits, got, want.rows)


def check(quality: Quality, limits: dict[str, float] = BROKEN) -> None:
    """Raise when the export is broken by `limits`' measures (everything else is reported, not judged)."""
    over = [
        f"{name.replace('_', ' ')} {value:.3g} > {limits[name]:g}"
        for name, value in (("kl_mean", quality.kl_mean), ("perplexity_ratio", quality.perplexity_ratio))
        if not value <= limits[name]  # `not <=` catches NaN
    ]
    if over:
        raise ExportValidationError(f"the graph is broken on sample text: {', '.join(over)} ({quality.summary()})")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
