"""A wide MatMulNBits weight split along N into products of at most SPLIT_BYTES each, joined by a Concat.

onnxruntime prepacks every MatMulNBits weight into its kernel's layout when a session loads, and frees the copy
read from the data file only once the packed one is made: for that moment the weight is held twice. A layer's
weight (about 1 MB) makes no difference; a lm_head does, since it is read last, when everything else is resident:
the default model's 8-bit lm_head (28 MB) put the int4 session's peak 27 MB above what it holds after loading,
and a 150k-word vocabulary at 8 bits is 136 MB. In slices of at most SPLIT_BYTES each slice is packed and freed
before the next is read, so the load peaks at one slice above the steady memory. The products are the same
columns computed the same way: the logits are unchanged, bit for bit.

The slices of each weight are written one after another and in order (onnx writes initializers to the data file in
the graph's order), so a table stored in them (tied_table.py) stays one contiguous block of the data file.
"""

from __future__ import annotations

from collections import Counter

from .graph_rewrites import drop_unused_initializers

SPLIT_BYTES = 8 << 20  # packed weight bytes per product: a load peaks about this much above its steady memory
ROWS_MULTIPLE = 16  # output columns per slice rounded to whole tiles of onnxruntime's packed layout
# MatMulNBits inputs stored [N, ...] (weight, scales, zero points, bias): sliced with the output columns. g_idx
# (input 4) is per row of K and is shared by every slice.
BY_COLUMN = (1, 2, 3, 5)


def split_wide_products(model, limit: int | None = None) -> int:
    """Split, in place, every MatMulNBits whose weight exceeds `limit` bytes (SPLIT_BYTES); returns how many were split.

    A product whose weights are not initializers (or a Cast of one, as float16 scales are stored), or are read by
    another node too, is left whole."""
    limit = SPLIT_BYTES if limit is None else limit
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    readers = Counter(i for n in graph.node for i in n.input)
    split = 0
    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        weight = initializers.get(node.input[1])
        size = 0 if weight is None else _bytes(weight)
        sources = _sources(node, initializers, producers, readers) if size > limit else None
        if sources is None:
            continue
        columns = _attribute(node, "N")
        width = -(-columns // -(-size // limit) // ROWS_MULTIPLE) * ROWS_MULTIPLE  # columns a slice, whole tiles
        _replace(model, node, sources, [(start, min(start + width, columns)) for start in range(0, columns, width)])
        split += 1
    if split:
        drop_unused_initializers(model)  # the whole weights the slices replace
    return split


def _sources(node, initializers, producers, readers) -> dict[int, tuple] | None:
    """Per input index in BY_COLUMN that the node has: (initializer, the Cast between it and the node or None); None
    when one is neither, or another node reads it too (the offsets of int4's default read its scales)."""
    from onnx import TensorProto

    found = {}
    for index in BY_COLUMN:
        if index >= len(node.input) or not node.input[index]:
            continue
        name = node.input[index]
        if readers[name] != 1:
            return None
        if name in initializers:
            found[index] = (initializers[name], None)
            continue
        cast = producers.get(name)
        if cast is None or cast.op_type != "Cast" or readers[cast.input[0]] != 1 or cast.input[0] not in initializers:
            return None
        found[index] = (initializers[cast.input[0]], cast)
    if any(tensor.data_location == TensorProto.EXTERNAL for tensor, _ in found.values()):
        return None  # its bytes are in a file this graph was loaded without: nothing to slice here
    return found


def _replace(model, node, sources: dict[int, tuple], spans: list[tuple[int, int]]) -> None:
    """The node's slices over `spans` of its output columns, their initializers (each input's slices consecutive,
    in column order) and a Concat giving the node's output, in place of the node and the Casts only it read; the
    initializers it read are left for `drop_unused_initializers`."""
    from onnx import helper, numpy_helper

    graph = model.graph
    columns = spans[-1][1]
    made: list = []  # the nodes that replace `node`, in order: Casts, products, the Concat
    names: dict[int, list[str]] = {}
    for index, (tensor, cast) in sources.items():
        values = numpy_helper.to_array(tensor)
        rows = values.reshape(columns, -1) if values.ndim == 1 else values
        names[index] = []
        for part, (start, stop) in enumerate(spans):
            piece = rows[start:stop]
            piece = piece.reshape(-1) if values.ndim == 1 else piece
            stored = f"{tensor.name}.{part}"
            graph.initializer.append(numpy_helper.from_array(piece, stored))
            if cast is None:
                names[index].append(stored)
                continue
            name = f"{cast.output[0]}.{part}"
            made.append(helper.make_node("Cast", [stored], [name], name=f"{cast.name}.{part}", to=_attribute(cast, "to")))
            names[index].append(name)
    outputs = []
    for part, (start, stop) in enumerate(spans):
        inputs = [names[i][part] if i in names else value for i, value in enumerate(node.input)]
        output = f"{node.output[0]}.{part}"
        product = helper.make_node("MatMulNBits", inputs, [output], name=f"{node.name}.{part}", domain=node.domain)
        product.attribute.extend(a for a in node.attribute if a.name != "N")
        product.attribute.append(helper.make_attribute("N", stop - start))
        made.append(product)
        outputs.append(output)
    made.append(helper.make_node("Concat", outputs, list(node.output), name=f"{node.name}.concat", axis=-1))
    nodes = list(graph.node)
    casts = [cast for _, cast in sources.values() if cast is not None]
    position = nodes.index(node) - sum(1 for cast in casts if nodes.index(cast) < nodes.index(node))
    for old in [node, *casts]:
        graph.node.remove(old)
    for offset, new in enumerate(made):
        graph.node.insert(position + offset, new)


def _bytes(tensor) -> int:
    from onnx import helper

    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _attribute(node, name: str):
    return next(a.i for a in node.attribute if a.name == name)
