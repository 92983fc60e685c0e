"""int8 with activations quantized at run time, for encoders: onnxruntime's MatMulInteger path.

An encoder embeds whole batches at once, where multiplying int8 by int8 pays: weights int8 per
output channel, each activation quantized to uint8 per tensor as it comes (DynamicQuantizeLinear,
which onnxruntime fuses into DynamicQuantizeMatMul). On MiniLM at batch 32 that ran 1.9-2.2x
PyTorch fp32 where weight-only MatMulNBits ran 0.8-1.2x. The catch is a per-tensor activation
scale: a few products lose much more than the rest (on MiniLM, the first layer's attention output
alone cost a quarter of the error), so `choose_kept` measures each product's effect on the
graph's output and keeps the worst at fp32 until the output is within a budget.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

# Relative L2 error of the outputs (the hidden states of the tokens that are not padding, the pooler's) that
# `choose_kept` allows. Measured on MiniLM (bench/speed/encode.py): 0.10 kept 6 of 37 products at fp32,
# ran 1.67x PyTorch fp32 and its sentence embeddings' lowest cosine to fp32 was 0.995; 0.12 kept 4, 1.80x,
# 0.993; 0.08 kept 9, 1.60x, 0.997; nothing kept: 0.18, 1.9-2.2x, 0.98.
BUDGET = 0.10


def products(model) -> list[str]:
    """The names of the matrix products by a constant weight: what quantization can replace."""
    initializers = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in initializers]


def quantize(model, only: Iterable[str] | None = None, keep: Iterable[str] = ()):
    """`model` with its products (those named in `only`, or all but `keep`) at dynamic int8; a new ModelProto."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    chosen = list(only) if only is not None else [name for name in products(model) if name not in set(keep)]
    silenced = logging.root.manager.disable
    logging.disable(logging.WARNING)  # it logs every tensor, and advice, on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="softprompt-int8-") as scratch:
            out = Path(scratch) / "model.onnx"
            quantize_dynamic(
                model,
                out,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=chosen,
                per_channel=True,
                weight_type=QuantType.QInt8,
                use_external_data_format=model.ByteSize() > 1 << 30,
                # the exporter's graphs leave some intermediate types to inference, which it needs otherwise
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
            return onnx.load(str(out))
    finally:
        logging.disable(silenced)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What `choose_kept` measures a graph on: input sets (feeds, and a [B, T] mask of the tokens that are not
    padding), and the error allowed, both as relative L2 (`budget`) and as the export's validation measures it
    (max |difference| / max |reference|, `tolerance`)."""

    sets: list[tuple[dict[str, np.ndarray], np.ndarray]]
    budget: float = BUDGET
    tolerance: float = 0.25


def output_error(model, calibration: Calibration, references: list[list[np.ndarray]]) -> tuple[float, float]:
    """The largest relative L2 and max-abs errors of `model`'s outputs against `references`, over every set and
    output; outputs per token count only where the set's mask is set."""
    l2, largest = 0.0, 0.0
    for (feeds, rows), reference in zip(calibration.sets, references, strict=True):
        for got, want in zip(_outputs(model, feeds), reference, strict=True):
            if got.shape[:2] == rows.shape:
                got, want = got[rows], want[rows]
            l2 = max(l2, float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-12)))
            largest = max(largest, float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12)))
    return l2, largest


def choose_kept(
    model, calibration: Calibration, progress: Callable[[Iterable], Iterable] = lambda items: items
) -> tuple[list[str], float]:
    """The products to keep at fp32 so that the dynamic-int8 graph's outputs stay within the calibration's limits.

    Each product is quantized alone and its error measured; errors of different products add about
    in squares, so the largest are kept until the rest fit the budget, then the whole graph is
    measured and one more kept until it fits. Returns the kept names and the relative L2 error reached.
    """
    references = [_outputs(model, feeds) for feeds, _ in calibration.sets]
    names = products(model)
    alone = {name: output_error(quantize(model, only=[name]), calibration, references)[0] for name in progress(names)}
    order = sorted(names, key=lambda name: alone[name], reverse=True)
    squares = np.cumsum([alone[name] ** 2 for name in reversed(order)])[::-1]  # squares[i]: the products from i on
    count = next((i for i, rest in enumerate(squares) if rest <= calibration.budget**2), len(order))
    while count < len(order):
        l2, largest = output_error(quantize(model, keep=order[:count]), calibration, references)
        if l2 <= calibration.budget and largest <= calibration.tolerance:
            return order[:count], l2
        count += 1
    return order, 0.0


def _outputs(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="softprompt-int8-") as scratch:
        if model.ByteSize() < 1 << 30:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        else:  # past protobuf's 2 GB a graph goes through a file with its weights beside it
            import onnx

            path = Path(scratch) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in feeds.items() if k in names})
