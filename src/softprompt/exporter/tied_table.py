"""A tied lm_head stored once, as the embedding table's int8 rows inside the graph's data, and where it is.

MatMulNBits at 8 bits, symmetric, blocks of 32, holds an [N, K] weight as the int8 table holds a [V, E] table, so
a lm_head equal to the table needs no second copy (docs/FORMAT.md, "A tied lm_head is the table").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softprompt.formats.embedding_table import BLOCK, TABLE_ZERO_POINT, quantize_rows

from .blocked import holds_in_float16
from .errors import ExportError
from .graph_rewrites import drop_unused_initializers, use_contrib_ops
from .lazy_weights import view

# The initializers a shared table is stored in (`share_table`), which `table_in_graph` finds.
TABLE_CODES = "embeddings.codes"
TABLE_SCALES = "embeddings.scales"


def share_table(
    model, matmuls, kept: dict[str, str], table: np.ndarray, *, int8: bool, web: bool, rows=None, base: Path | None = None
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
    Returns whether it did (the lm_head is found, equal to the table, and kept at 8 bits).
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
    if tuple(weight.dims) != (width, vocab) or not np.array_equal(view(weight, base), table.T):
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
    product = helper.make_node(
        "MatMulNBits",
        [head.input[0], TABLE_CODES, scales_input],
        list(head.output),
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
    drop_unused_initializers(model)
    use_contrib_ops(model)
    kept[head.name] = "table"  # done: the quantizers leave it alone
    return True


def table_in_graph(path: Path) -> dict[str, int] | None:
    """Where a graph written by `apply_precision` holds the embedding table (`share_table`), or None.

    Offsets are into the graph's external data file (`path` + ".data"); softprompt.json records them
    so the runtime, which has no onnx package, can map the rows directly.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    places, half = {}, False
    for tensor in graph.initializer:
        if tensor.name in (TABLE_CODES, TABLE_SCALES):
            info = {entry.key: entry.value for entry in tensor.external_data}
            if info.get("location") != path.name + ".data":
                raise ExportError(f"{path}: {tensor.name} is not in {path.name}.data but in {info.get('location')!r}")
            places[tensor.name] = int(info.get("offset", 0))
            half = half or (tensor.name == TABLE_SCALES and tensor.data_type == onnx.TensorProto.FLOAT16)
    if not places:
        return None
    return {
        "codes_offset": places[TABLE_CODES],
        "scales_offset": places[TABLE_SCALES],
        "zero_point": TABLE_ZERO_POINT,
        **({"scales_dtype": "float16"} if half else {}),
    }


def lm_head(model, matmuls) -> list:
    """The constant matrix product that makes the logits (through a bias Add at most), whatever it is named."""
    producers = {out: n for n in model.graph.node for out in n.output}
    node = producers.get("logits")
    if node is not None and node.op_type == "Add":
        node = next((producers[i] for i in node.input if i in producers and producers[i] in matmuls), None)
    return [node] if node is not None and node in matmuls else []
