"""A tied lm_head stored once, as the embedding table's int8 rows inside the graph's data, and where it is.

MatMulNBits at 8 bits, symmetric, blocks of 32, holds an [N, K] weight as the int8 table holds a [V, E] table, so
a lm_head equal to the table needs no second copy (docs/FORMAT.md, "A tied lm_head is the table").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softprompt.formats.embedding_table import BLOCK, TABLE_ZERO_POINT, TableFile, quantize_rows, row_slices

from . import lazy_weights
from .blocked import holds_in_float16
from .errors import ExportError
from .graph_rewrites import drop_unused_initializers, use_contrib_ops
from .lazy_weights import view

# The initializers a shared table is stored in (`share_table`), which `table_in_graph` finds.
TABLE_CODES = "embeddings.codes"
TABLE_SCALES = "embeddings.scales"
TABLE_SCALE = "embeddings.scale"  # what the logits are divided by where the table is the lm_head times a factor
# The graph's metadata entry that records a factor the shared rows are multiplied by to give the table (`table_in_graph`).
TABLE_FACTOR = "softprompt.table_factor"


def share_table(
    model,
    matmuls,
    kept: dict[str, str],
    table: np.ndarray | TableFile,
    *,
    int8: bool,
    web: bool,
    rows=None,
    factor: float | None = None,
    base: Path | None = None,
) -> bool:
    """Make a tied lm_head that stays at 8 bits the int8 embedding table itself, stored once.

    MatMulNBits at 8 bits, symmetric, blocks of 32, holds an [N, K] weight as N rows of K codes
    (plus 128) with a scale per block of 32: the int8 table's layout (`quantize_rows`), the vocab
    being N. So a lm_head equal to the table is written as its codes and scales, and the runtime
    gathers rows from the graph's data file instead of a second copy (28 MB + 3.5 MB for the
    default model). Symmetric int8 over blocks of 32 is GGUF's Q8_0, in which many small models'
    tables ship, so for them it is exact; for others it is the table's own int8 error.
    `kept` says what each product keeps (the lm_head "int8"; unnamed, it is at 8 bits when the export is, `int8`);
    `web`: the export is for pages, whose DequantizeLinear takes float32 scales. `rows` gives the table's int8 codes and
    scales where they were made already (`exact_int8`); `base`, the folder of the data file the graph was loaded
    without (the lm_head is then read from it).
    A lm_head the table is a multiple of (`table_scale`: Gemma's) is the table too, its logits divided by the factor.
    With `factor`, `rows` are the lm_head's own rows, exactly (a GGUF file's Q8_0 blocks: `factored_table_rows`), of
    which the table is `factor` times, exactly: they are stored as they are, the product gives the logits with no
    division, and the graph records the factor (`TABLE_FACTOR`) for the runtime to apply to the rows it reads.
    Returns whether it did (the lm_head is found, the table or a multiple of it, and kept at 8 bits).
    """
    import onnx
    from onnx import helper, numpy_helper

    vocab, width = table.shape
    heads = lm_head(model, matmuls)
    if not heads or width % BLOCK:
        return False
    head = heads[0]
    if kept.get(head.name, "int8" if int8 else None) != "int8":
        return False
    weight = next(t for t in model.graph.initializer if t.name == head.input[1])
    if tuple(weight.dims) != (width, vocab):
        return False
    if factor is not None:
        if rows is None or not _head_is(weight, base, *rows):
            return False
        scale: float | None = 1.0
        model.metadata_props.add(key=TABLE_FACTOR, value=repr(float(factor)))
    else:
        scale = table_scale(view(weight, base).T, table)
    if scale is None:
        return False
    codes, scales = rows if rows is not None else quantize_rows(table, "int8")
    stored = (codes.view(np.uint8) ^ np.uint8(TABLE_ZERO_POINT)).reshape(vocab, width // BLOCK, BLOCK)  # code + 128
    # float16 where that holds every scale (a Q8_0 table's are float16 in the file), behind a Cast onnxruntime folds;
    # not for pages, whose DequantizeLinear (qdq.py) takes the scales' own type
    small = not web and holds_in_float16(scales)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(stored, TABLE_CODES),
            numpy_helper.from_array((scales.astype(np.float16) if small else scales).reshape(-1), TABLE_SCALES),
        ]
    )
    scales_input = TABLE_SCALES
    if small:
        scales_input = f"{TABLE_SCALES}.float32"
        model.graph.node.insert(0, helper.make_node("Cast", [TABLE_SCALES], [scales_input], to=onnx.TensorProto.FLOAT))
    outputs = list(head.output) if scale == 1 else [f"{head.output[0]}.times_table_scale"]
    product = helper.make_node(
        "MatMulNBits",
        [head.input[0], TABLE_CODES, scales_input],
        outputs,
        name=head.name,
        domain="com.microsoft",
        K=width,
        N=vocab,
        bits=8,
        block_size=BLOCK,
    )
    index = list(model.graph.node).index(head)
    model.graph.node.remove(head)
    model.graph.node.insert(index, product)
    if scale != 1:  # a head the table is a multiple of (Gemma's: its rows times sqrt(width)): the logits divided back
        model.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), TABLE_SCALE))
        divide = helper.make_node("Div", [outputs[0], TABLE_SCALE], list(head.output), name=f"{head.name}.table_scale")
        model.graph.node.insert(index + 1, divide)
    drop_unused_initializers(model)
    use_contrib_ops(model)
    kept[head.name] = "table"  # done: the quantizers leave it alone
    return True


def _head_is(weight, base: Path | None, codes: np.ndarray, scales: np.ndarray) -> bool:
    """Whether the lm_head's [E, V] weight is exactly int8 `codes` [V, E] times `scales` [V, E / BLOCK], compared a
    block of E at a time: its rows read from the data file (not mapped, which kept every page of a 262k-vocabulary
    head resident) against the float32 values of one block of codes for the whole vocabulary."""
    width = codes.shape[1]
    for block, start in enumerate(range(0, width, BLOCK)):
        head = lazy_weights.rows(weight, start, start + BLOCK, base)
        values = codes[:, start : start + BLOCK].astype(np.float32) * scales[:, block, None].astype(np.float32)
        if not np.array_equal(head, values.T):
            return False
    return True


def table_scale(head_rows, table: np.ndarray | TableFile) -> float | None:
    """The float32 `s` with `table` exactly `head_rows * s` in float32 (1 for a lm_head tied to the table; sqrt of
    the width for Gemma's, whose embedding module scales the rows it shares with the lm_head), or None for a head that
    is not the table. `head_rows`: the lm_head's weight read as [V, E] rows (a transposed view of it is enough).

    Compared a slice at a time, stopping at the first slice that differs: most untied heads differ in the first, and
    neither is read whole nor compared in one mask of a large vocabulary (0.2 GB)."""
    first = next(row_slices(len(table)))
    head, rows = np.asarray(head_rows[first], np.float32), np.asarray(table[first], np.float32)
    at = int(np.argmax(np.abs(head)))
    guess = np.float32(rows.flat[at] / head.flat[at]) if head.flat[at] != 0 else np.float32(1)
    # the quotient of one product may be a float off the factor; the neighbours are tried too
    near = [np.nextafter(guess, np.float32(side)) for side in (np.inf, -np.inf)]
    for scale in dict.fromkeys([np.float32(1), guess, *near]):
        if (
            np.isfinite(scale)
            and scale > 0
            and all(
                np.array_equal(np.asarray(head_rows[part], np.float32) * scale, table[part]) for part in row_slices(len(table))
            )
        ):
            return float(scale)
    return None


def table_in_graph(path: Path) -> dict[str, int | float | str] | None:
    """Where a graph written by `apply_precision` holds the embedding table (`share_table`), or None; with `factor`
    where the table is the stored rows times it.

    Offsets are into the graph's external data file (`path` + ".data"); softprompt.json records them
    so the runtime, which has no onnx package, can map the rows directly.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    factor = next((float(entry.value) for entry in model.metadata_props if entry.key == TABLE_FACTOR), None)
    places: dict[str, list[tuple[int, int, int]]] = {}  # codes or scales: (slice, offset, length) of each of its slices
    half = False
    for tensor in graph.initializer:
        stem, _, part = tensor.name.rpartition(".")
        stem, part = (stem, int(part)) if part.isdigit() and stem in (TABLE_CODES, TABLE_SCALES) else (tensor.name, 0)
        if stem in (TABLE_CODES, TABLE_SCALES):
            info = {entry.key: entry.value for entry in tensor.external_data}
            if info.get("location") != path.name + ".data":
                raise ExportError(f"{path}: {tensor.name} is not in {path.name}.data but in {info.get('location')!r}")
            places.setdefault(stem, []).append((part, int(info.get("offset", 0)), int(info["length"])))
            half = half or (stem == TABLE_SCALES and tensor.data_type == onnx.TensorProto.FLOAT16)
    if not places:
        return None
    return {
        "codes_offset": _start(path, TABLE_CODES, places[TABLE_CODES]),
        "scales_offset": _start(path, TABLE_SCALES, places[TABLE_SCALES]),
        "zero_point": TABLE_ZERO_POINT,
        **({"scales_dtype": "float16"} if half else {}),
        **({"factor": factor} if factor is not None else {}),
    }


def _start(path: Path, name: str, slices: list[tuple[int, int, int]]) -> int:
    """Where the table's `name` starts in the data file: its slices (a lm_head split by `split_wide_products`) must
    follow one another there in order, as the runtime reads the rows as one block."""
    slices = sorted(slices)
    for (_, offset, length), (part, following, _) in zip(slices, slices[1:]):
        if following != offset + length:
            raise ExportError(
                f"{path}: slice {part} of {name} is at byte {following} of the data file, not right after the one before "
                f"(which ends at {offset + length}); the table must be one block"
            )
    return slices[0][1]


def lm_head(model, matmuls) -> list:
    """The constant matrix product that makes the logits (through a bias Add at most), whatever it is named."""
    producers = {out: n for n in model.graph.node for out in n.output}
    node = producers.get("logits")
    if node is not None and node.op_type == "Add":
        node = next((producers[i] for i in node.input if i in producers and producers[i] in matmuls), None)
    return [node] if node is not None and node in matmuls else []
