"""The precision of an export's graphs: fp32 as traced or built, fp16 for CUDA, int8 and int4 for CPUs.

int8 and int4 are weight-only for decoders and encoder-decoders: every constant matrix product (the
lm_head included) becomes onnxruntime's MatMulNBits, weights stored in blocks of `block_size` values
that share a scale (and a zero point unless symmetric), activations and the KV cache stay float32.
Encoders at int8 quantize activations too (`dynamic_int8`), which pays at batch. fp16 converts the
whole graph, keeping float32 inputs and outputs so the runtime feeds every precision alike.

The embedding table is stored small too (int8 with a scale per block of 32, fp16 for fp16) and read
back as float32 rows. The fingerprint is the fp32 model's and prompts stay float32: a prompt
trained on the fp32 model is the same task on each precision of that model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from softprompt.formats.embedding_table import TableFile, exact_int8
from softprompt.formats.export_folder import PRECISIONS

from . import nbits_slices
from .errors import ExportError
from .graph_rewrites import drop_unused_initializers, gemm_as_matmul, offset_int4, use_contrib_ops
from .lazy_weights import load, load_besides_weights, read_in, release
from .qdq import as_dequantize_matmul
from .tied_table import lm_head, share_table
from .wide_products import split_wide_products

BITS = {"int8": 8, "int4": 4}
GGUF = "gguf"  # a GGUF source's own blocks, read from the file (gguf_weights.py)
ALGORITHMS = ("rtn", "offset", "hqq", "dynamic")
# What the embedding table is stored in at each precision (rows are dequantized to float32 on lookup).
# gguf: the file's own int8 blocks where they hold the table exactly, else the smallest that does (`gguf_table`).
TABLE_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int8", GGUF: "int8"}
# How far a graph's logits may move from PyTorch fp32, relative to their scale, before an export is
# refused. Measured on the default model: fp16 0.006, int8 0.10, int4 0.07 (offset), all keeping its
# tasks; int4 with integer zero points (rtn) moves them by 0.44 and costs its sentiment task 6.8
# points, so it is refused unless --tolerance says otherwise.
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-2, "int8": 0.25, "int4": 0.25, GGUF: 0.25}


@dataclasses.dataclass(frozen=True)
class Precision:
    """What export-model --precision and its options asked for."""

    name: str = "fp32"
    block_size: int = 32  # values per scale (int8/int4): smaller keeps more accuracy, costs more scales
    symmetric: bool = False  # no zero points: smaller, but a skewed block loses a level
    accuracy_level: int | None = None  # MatMulNBits' compute type (4: int8 activations); None: the kind's best, `for_kind`
    # "rtn" (round to nearest); int4 only: "offset" (float block minimum) or "hqq" (half-quadratic); int8 only:
    # "dynamic" (int8 activations too, `dynamic_int8`); None: the kind's best, `for_kind`
    algorithm: str | None = None
    keep: tuple[str, ...] = ()  # weights left at full precision: names or their beginnings (shell patterns), e.g. "lm_head"
    web: bool = False  # the quantized weights as DequantizeLinear + MatMul, for onnxruntime-web (qdq.py)

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ExportError(f"precision {self.name!r}; expected one of {', '.join(PRECISIONS)}")
        if self.web and self.name not in BITS:
            raise ExportError(f"--web is for quantized weights (--precision int8 or int4), not {self.name}")
        if self.name == GGUF and (self.algorithm is not None or self.keep or self.symmetric):
            raise ExportError(
                "--precision gguf keeps the file's own blocks; --algorithm, --symmetric and --keep are for int8/int4"
            )
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ExportError(f"accuracy level {self.accuracy_level!r}; expected 0 to 4 (4: int8 compute)")
        if self.name in BITS:
            self.kept()
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise ExportError(f"block size {self.block_size}; expected a power of two, at least 16")
            if self.algorithm not in (None, *ALGORITHMS):
                raise ExportError(f"quantization algorithm {self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
            if self.algorithm in ("hqq", "offset") and self.name != "int4":
                raise ExportError(f"--algorithm {self.algorithm} quantizes to 4 bits only; use it with --precision int4")
            if self.algorithm == "dynamic" and self.name != "int8":
                raise ExportError("--algorithm dynamic quantizes to 8 bits only; use it with --precision int8")
            if self.algorithm == "dynamic" and self.accuracy_level is not None:
                raise ExportError(
                    "--accuracy-level sets MatMulNBits' compute type; --algorithm dynamic computes in int8 without it"
                )
            if self.web and self.algorithm in ("dynamic", "hqq"):
                raise ExportError(f"--web stores integer-coded blocks for onnxruntime-web; --algorithm {self.algorithm} has none")

    @property
    def quantized(self) -> bool:
        return self.name in BITS or self.name == GGUF

    @property
    def tolerance(self) -> float:
        """What validation allows by default: the precision's own, or 1 for the fast int4 recipe (`FAST_INT4`), whose
        logits move by up to 0.93 of their scale on the default model."""
        fast = self.name == "int4" and all(getattr(self, key) == value for key, value in FAST_INT4.items())
        return FAST_INT4_TOLERANCE if fast else TOLERANCES[self.name]

    def kept(self) -> list[tuple[str, str]]:
        """--keep rules as (pattern, precision kept): "lm_head" keeps fp32, "lm_head=int8" 8 bits in an int4 export."""
        rules = []
        for rule in self.keep:
            pattern, _, keep_as = rule.partition("=")
            keep_as = keep_as or "fp32"
            if not pattern or keep_as not in ("fp32", "int8") or (keep_as == "int8" and self.name != "int4"):
                raise ExportError(f"--keep {rule!r}; expected NAME or NAME=fp32 (or NAME=int8 in an int4 export)")
            rules.append((pattern, keep_as))
        return rules

    def record(self) -> dict[str, Any]:
        """What softprompt.json keeps of it (the settings that matter for this precision only)."""
        if not self.quantized:
            return {"precision": self.name}
        if self.name == GGUF:  # the blocks are the file's: only the compute type was chosen
            return {"precision": self.name, "accuracy_level": self.accuracy_level}
        if self.algorithm == "dynamic":  # per-channel weights, no blocks; int8 compute
            return {"precision": self.name, "algorithm": self.algorithm, "keep": list(self.keep)}
        return {
            "precision": self.name,
            "block_size": self.block_size,
            "symmetric": self.symmetric,
            "accuracy_level": self.accuracy_level,
            "algorithm": self.algorithm,
            "keep": list(self.keep),
            **({"web": True} if self.web else {}),
        }


# int4 as onnxruntime-genai quantizes it: an integer grid without zero points and the lm_head at 4 bits too. The fastest
# and smallest int4; on the default model it changes the top token far more often than the default recipe (QUALITY.md),
# and its logits move by up to 0.93 of their scale. Decoders are judged by their quality (quality.py); an
# encoder-decoder at this recipe against a tolerance of 1 (refused only when broken).
FAST_INT4 = {"algorithm": "rtn", "symmetric": True, "keep": ()}
FAST_INT4_TOLERANCE = 1.0


def default_precision(name: str, **chosen: Any) -> Precision:
    """`name` with the settings measured best for it (docs/QUALITY.md), overridden by whatever `chosen` sets.

    The compute type follows the kind of model (`for_kind`). int4 keeps the
    lm_head at 8 bits, where a 4-bit lm_head alone costs the most accuracy, and stores each block's
    minimum as a float ("offset"): with integer zero points (rtn) the default model's greedy text
    departed from fp32 within a token and its sentiment task lost 6.8 points.
    """
    defaults: dict[str, Any] = {"int4": {"algorithm": "offset", "keep": ("lm_head=int8",)}}.get(name, {})
    return Precision(name, **{**defaults, **{k: v for k, v in chosen.items() if v is not None}})


def for_kind(precision: Precision, kind: str) -> Precision:
    """`precision` with the algorithm and MatMulNBits' compute type chosen for `kind` where they were left open.

    Decoders and encoder-decoders generate a few rows a step: weight-only MatMulNBits with int8
    activations per block (level 4) ran the default model at 95 tokens/s, float compute (level 0)
    at 2. Encoders embed whole batches at once, where int8 by int8 pays: MiniLM at batch 32 ran
    1.6-1.8x PyTorch fp32 at int8 "dynamic", 0.8-1.2x with MatMulNBits at level 0, 0.95x at 4.
    """
    if not precision.quantized:
        return precision
    if precision.algorithm is None and precision.name in BITS:
        dynamic = kind == "encoder" and precision.name == "int8" and precision.accuracy_level is None
        precision = dataclasses.replace(precision, algorithm="dynamic" if dynamic else "rtn")
    if precision.accuracy_level is not None or precision.algorithm == "dynamic":
        return precision
    return dataclasses.replace(precision, accuracy_level=0 if kind == "encoder" else 4)


def apply_precision(
    path: Path,
    precision: Precision,
    table: np.ndarray | TableFile | None = None,
    calibration: Any = None,
    log: Callable[[str], None] = lambda message: None,
    gguf: Any = None,
) -> dict[str, Any]:
    """Rewrite the fp32 graph at `path` in `precision`, in place; returns what changed (counts, bytes).

    With the float32 embedding `table`, an 8-bit lm_head that equals it becomes the table's int8 rows
    (see `share_table`; `table_in_graph` then says where they are). `calibration` (a
    `dynamic_int8.Calibration`) is what the "dynamic" algorithm measures to choose which products stay
    at fp32 where --keep does not say."""
    import onnx

    if precision.name == "fp32":
        return {}
    before = _size(path)
    # Each product's weight is read from the data file as it is replaced (`lazy_weights`) instead of the whole float32
    # graph held at once (Qwen 0.5B: 1.9 GB); the dynamic algorithm's quantizer takes the graph whole.
    lazy = precision.name == GGUF or (precision.quantized and precision.algorithm != "dynamic")
    model = onnx.load(str(path), load_external_data=not lazy)
    if precision.name == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        changed = {"fp16_initializers": sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)}
    elif precision.name == GGUF:
        if gguf is None:
            raise ExportError("--precision gguf stores a GGUF file's own blocks; the model was not loaded from a .gguf file")
        model, changed = _gguf(model, precision, table, gguf, path.parent)
    else:
        model, changed = _quantize(model, precision, table, calibration, log, path.parent if lazy else None)
        if precision.web:
            changed["dequantize_matmul"] = as_dequantize_matmul(model)
    if not precision.web and (split := split_wide_products(model)):
        changed["matmuls_split"] = split  # a lm_head in slices, each packed and freed in turn when a session loads
    # The weights go to model.onnx.data (replacing any fp32 one, whose weights are in memory by now):
    # onnxruntime then reads them from the file instead of out of a copy of the whole protobuf, 15 MB
    # less peak memory for the default model at int4.
    # onnx appends to a data file that exists: the fp32 one (a model above 1 GiB) must go first, or its dead weights
    # stay in the folder (a 0.5B model's int4 export came out larger than its fp32 one).
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    scratch = path.with_name(f".{path.name}.{precision.name}")
    onnx.save_model(model, str(scratch), save_as_external_data=True, location=data.name, all_tensors_to_one_file=True)
    os.replace(scratch, path)
    os.chmod(data, path.stat().st_mode & 0o777)  # onnx writes it owner-only
    return {**changed, "bytes_fp32": before, "bytes": _size(path)}


def _nbits_quantizer():
    """onnxruntime's MatMulNBits quantizer module, imported without its side effect on the caller's logging.

    Importing it calls `logging.basicConfig(level=INFO)` (onnxruntime 1.32), which gives the root logger a
    handler at INFO: from then on every library in the process (onnx_ir's passes, for one, a line per
    weight) prints its INFO messages. The root logger is put back as it was, and the quantizer's own logger,
    which logs every node at INFO, is kept to warnings.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def _quantize(
    model, precision: Precision, table: np.ndarray | TableFile | None, calibration=None, log=lambda message: None, base=None
):
    """`base`: the folder of the data file `model` was loaded without; each weight is read from it as it is converted
    (HQQ's quantizer gets the graph loaded whole)."""
    nbits_quantizer = _nbits_quantizer()

    if base is not None:
        load_besides_weights(model, base)
    gemm_as_matmul(model)
    initializers = {t.name for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in initializers]
    rules = precision.kept()
    kept: dict[str, str] = {}  # node name -> the precision it keeps
    for pattern, keep_as in rules:
        found = [n for n in matmuls if any(fnmatch.fnmatch(name, pattern + "*") for name in (n.input[1], n.name))]
        if not found and pattern == "lm_head":
            found = lm_head(model, matmuls)
            if not found and not any(o.name == "logits" for o in model.graph.output):
                continue  # a graph without logits (an encoder) has no lm_head to keep
        if not found:
            names = ", ".join(sorted({n.input[1] for n in matmuls})[:6])
            raise ExportError(f"--keep {pattern}: matches no weight of the graph; its weights are named like {names}, ...")
        kept.update((n.name, keep_as) for n in found if n.name not in kept)
    if precision.algorithm == "dynamic":
        return _dynamic(model, [name for name, keep_as in kept.items() if keep_as == "fp32"], bool(rules), calibration, log)
    shared = table is not None and share_table(
        model, matmuls, kept, table, int8=precision.name == "int8", web=precision.web, base=base
    )
    if precision.algorithm == "offset":
        dims = {t.name: t.dims for t in model.graph.initializer}  # shapes, without reading the data
        offset = [n.name for n in matmuls if n.name not in kept and dims[n.input[1]][0] % precision.block_size == 0]
        offset_int4(model, offset, precision.block_size, base)
        kept.update((name, "offset") for name in offset)  # done: the passes below leave them alone
        kept.update((f"{name}.offsets", "offset product") for name in offset)  # their small float products too
    at_int8 = [name for name, keep_as in kept.items() if keep_as == "int8"]
    if at_int8:
        config = nbits_quantizer.DefaultWeightOnlyQuantConfig(
            block_size=precision.block_size, is_symmetric=precision.symmetric, bits=8
        )
        others = {n.name for n in model.graph.node if n.name not in at_int8}
        _quantize_each(model, nbits_quantizer.DefaultWeightOnlyQuantizer(config), others, base)
    bits = BITS[precision.name]
    if precision.algorithm == "hqq":
        if base is not None:
            load(model, base)
        config = nbits_quantizer.HQQWeightOnlyQuantConfig(block_size=precision.block_size, bits=bits)
        quantizer = nbits_quantizer.MatMulNBitsQuantizer(model, nodes_to_exclude=list(kept), algo_config=config)
        quantizer.process()
        model = quantizer.model.model
    else:
        config = nbits_quantizer.DefaultWeightOnlyQuantConfig(
            block_size=precision.block_size, is_symmetric=precision.symmetric, bits=bits
        )
        _quantize_each(model, nbits_quantizer.DefaultWeightOnlyQuantizer(config), set(kept), base)
    if base is not None:
        load(model, base)  # what stays float32
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nbits:
        raise ExportError(f"--precision {precision.name}: the graph has no matrix product with constant weights to quantize")
    if precision.accuracy_level is not None:  # the compute type is the op's attribute, whatever made the weights
        for node in nbits:
            _set_attribute(node, "accuracy_level", precision.accuracy_level)
    counts = Counter(f"int{_bits(n)}" for n in nbits)
    return model, {
        **{f"matmuls_{k}": v for k, v in sorted(counts.items())},
        **(
            {"int4_with_float_offsets": sum(1 for v in kept.values() if v == "offset")} if precision.algorithm == "offset" else {}
        ),
        "matmuls_fp32": sum(1 for v in kept.values() if v == "fp32"),
        **({"lm_head_is_the_table": 1} if shared else {}),
    }


def _quantize_each(model, quantizer, exclude: set[str], base: Path | None) -> None:
    """onnxruntime's round-to-nearest MatMulNBits quantization (`DefaultWeightOnlyQuantizer`, what
    `MatMulNBitsQuantizer.process` runs on every MatMul) one product at a time, in place: each weight is read from the
    data file in `base` as it is quantized, a slice of rows at a time (`nbits_slices`), so a big model's float32
    weights are never all in memory (a 0.5B model's int8 conversion peaked at 8.5 GB with them)."""
    initializers = {t.name: t for t in model.graph.initializer}
    readers = Counter(i for n in model.graph.node for i in n.input)
    nodes = []
    for node in model.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or node.name in exclude:
            nodes.append(node)
            continue
        if nbits_slices.sliceable(weight, quantizer.config):
            made, tensors = nbits_slices.quantize(node, weight, quantizer, base)
            nodes += made
            model.graph.initializer.extend(tensors)
        else:
            if base is not None:
                read_in(weight, base)
            nodes += quantizer.quantize(node, [model.graph])
        if readers[weight.name] == 1:
            release(weight)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model)
    use_contrib_ops(model)


def _gguf(model, precision: Precision, table: np.ndarray | TableFile | None, rows, base: Path):
    """The GGUF's blocks for every product made of its rows (gguf_weights.py); a tied lm_head that is the Q8_0 table,
    or of which the table is a multiple (Gemma's), is stored once, as the table (`share_table`: its int8 rows are
    then the file's own). `model` comes without its
    external data (in `base`): the products' weights are read one at a time, everything else is loaded here."""
    from .gguf_weights import factored_table_rows, keep_gguf_blocks

    load_besides_weights(model, base)
    gemm_as_matmul(model)
    initializers = {t.name for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in initializers]
    kept: dict[str, str] = {n.name: "int8" for n in lm_head(model, matmuls)}
    exact = exact_int8(table) if table is not None and kept else None
    shared = False
    if exact is not None:
        shared = share_table(model, matmuls, kept, table, int8=False, web=precision.web, rows=exact, base=base)
    elif table is not None and kept and (found := factored_table_rows(table, rows)) is not None:
        codes, scales, factor = found  # Gemma's: the file's Q8_0 table times sqrt(width), the head its own blocks
        shared = share_table(
            model, matmuls, kept, table, int8=False, web=precision.web, rows=(codes, scales), factor=factor, base=base
        )
    counts = keep_gguf_blocks(model, rows, skip={name for name, how in kept.items() if how == "table"}, base=base)
    load(model, base)  # the products left float32
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nbits:
        raise ExportError(f"--precision gguf: no matrix product of the graph is made of {rows.path.name}'s quantized rows")
    if precision.accuracy_level is not None:
        for node in nbits:
            _set_attribute(node, "accuracy_level", precision.accuracy_level)
    return model, {
        **{f"matmuls_{form}": n for form, n in counts.items() if form != "fp32_kept"},
        "matmuls_fp32": counts.get("fp32_kept", 0),
        **({"lm_head_is_the_table": 1} if shared else {}),
    }


def _dynamic(model, kept: list[str], chosen: bool, calibration, log):
    """int8 weights and activations (`dynamic_int8`); unless --keep `chosen` them, the products kept at fp32
    are those that `calibration` shows move the output most."""
    from . import dynamic_int8

    error = None
    if not chosen and calibration is not None:
        from tqdm.auto import tqdm

        names = dynamic_int8.products(model)
        log(f"      measuring the error of each of the {len(names)} matrix products at int8, to keep the worst at fp32")

        def progress(items):
            return tqdm(items, desc="products", unit="product", total=len(names), leave=False, disable=None)

        kept, error = dynamic_int8.choose_kept(model, calibration, progress=progress)
    model = dynamic_int8.quantize(model, keep=kept)
    quantized = sum(1 for n in model.graph.node if n.op_type == "MatMulInteger")
    if not quantized:
        raise ExportError("--precision int8: the graph has no matrix product with constant weights to quantize")
    return model, {
        "matmuls_int8_dynamic": quantized,
        "matmuls_fp32": len(kept),
        "kept_fp32": kept,
        **({"calibration_error": round(error, 4)} if error is not None else {}),
    }


def _bits(node) -> int:
    return next((a.i for a in node.attribute if a.name == "bits"), 4)


def _set_attribute(node, name: str, value: int) -> None:
    import onnx

    for attribute in list(node.attribute):
        if attribute.name == name:
            node.attribute.remove(attribute)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def dequantized(
    weights: dict[str, np.ndarray], precision: Precision, table: np.ndarray | None = None, lm_head: str | None = None
) -> dict[str, np.ndarray]:
    """The float32 values each [K, N] weight takes in a graph exported at `precision`, as onnxruntime reads them.

    For quantization-aware prompt training: the weights are quantized by the very code the exporter
    runs (`_quantize`, its defaults, keep rules and tied-table sharing; `lm_head` names the weight
    that makes the logits) and read back by running each product on the identity at float compute
    (accuracy level 0), so whatever the algorithm stored (integer or float zero points, offsets,
    the table's codes) comes back exactly. Activations, which accuracy level 4 rounds to int8 per
    block at run time, are not modelled.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if not precision.quantized:
        raise ExportError(f"dequantized: precision {precision.name}; expected int8 or int4 (weights that MatMulNBits stores)")
    precision = dataclasses.replace(precision, accuracy_level=0)
    out: dict[str, np.ndarray] = {}
    for width in sorted({w.shape[0] for w in weights.values()}):
        names = [name for name, w in weights.items() if w.shape[0] == width]
        outputs = {name: "logits" if name == lm_head else f"{name}.out" for name in names}
        nodes = [helper.make_node("MatMul", ["x", name], [outputs[name]], name=name) for name in names]
        graph = helper.make_graph(
            nodes,
            f"width{width}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [width, width])],
            [helper.make_tensor_value_info(outputs[name], TensorProto.FLOAT, None) for name in names],
            [numpy_helper.from_array(np.ascontiguousarray(weights[name], dtype=np.float32), name) for name in names],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model, _ = _quantize(model, precision, table if lm_head in names else None)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run([outputs[name] for name in names], {"x": np.eye(width, dtype=np.float32)})
        out.update(zip(names, values))
        del model, session
    missing = [name for name, w in weights.items() if out[name].shape != w.shape]
    if missing:
        raise ExportError(f"dequantizing {missing[0]} gave {out[missing[0]].shape}; expected {weights[missing[0]].shape}")
    return out
