"""A graph's initializers read from its external data file one at a time, when a conversion needs them.

Converting a 0.5B model loaded whole held its 1.9 GB of float32 weights, the converted copies and the
quantizers' working arrays at once (8.4 GB at int4). Loaded without its data, a graph costs its nodes;
each weight is then mapped read-only from the file while it is converted (`view`), and what is left
float32 is read in at the end (`load`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def external_reference(name: str, dtype, shape: tuple[int, ...], location: str, offset: int):
    """An initializer whose values are `shape` values of `dtype` at byte `offset` of the file `location` beside the
    graph (made by hand: onnx's set_external_data wants the bytes inside the tensor first)."""
    from onnx import TensorProto, helper

    dtype = np.dtype(dtype)
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=shape)
    tensor.data_location = TensorProto.EXTERNAL
    length = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def view(tensor, base: Path | None = None) -> np.ndarray:
    """A float32 initializer's values without a copy: its raw bytes, or its place in the external data file under
    `base` mapped read-only where the graph was loaded without its data."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    shape = tuple(tensor.dims)
    if tensor.data_type == TensorProto.FLOAT and uses_external_data(tensor) and base is not None:
        info = ExternalDataInfo(tensor)
        return np.memmap(base / info.location, dtype=np.float32, mode="r", offset=info.offset or 0, shape=shape)
    if tensor.data_type == TensorProto.FLOAT and tensor.raw_data:
        return np.frombuffer(tensor.raw_data, dtype=np.float32).reshape(shape)
    return numpy_helper.to_array(tensor, str(base or ""))


def rows(tensor, start: int, stop: int, base: Path | None = None) -> np.ndarray:
    """Rows `start:stop` of a 2-D float32 initializer, read from its data file under `base` (not mapped: a mapping
    keeps every page it touched resident until it is closed) or viewed in its raw bytes."""
    from onnx import TensorProto
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if not (tensor.data_type == TensorProto.FLOAT and uses_external_data(tensor) and base is not None):
        return view(tensor, base)[start:stop]
    from softprompt.formats.embedding_table import read_rows

    info = ExternalDataInfo(tensor)
    return read_rows(base / info.location, np.float32, info.offset or 0, int(tensor.dims[1]), start, stop)


def load(model, base: Path, names: set[str] | None = None) -> None:
    """Read the external data of `model`'s initializers (those in `names`, or all) into the graph."""
    for tensor in model.graph.initializer:
        if names is None or tensor.name in names:
            read_in(tensor, base)


def load_besides_weights(model, base: Path) -> None:
    """Read in every initializer but the MatMul weights a conversion replaces one at a time (norms, biases, caches,
    Gemm weights)."""
    load(model, base, {t.name for t in model.graph.initializer} - matmul_weights(model))


def read_in(tensor, base: Path) -> None:
    """One initializer's external data read into it (nothing to do for one that holds its data)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(tensor):
        load_external_data_for_tensor(tensor, str(base))
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def matmul_weights(model) -> set[str]:
    """The names of the initializers that are a MatMul's second input: the weights a conversion replaces."""
    return {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2}


def release(tensor) -> None:
    """Let a replaced initializer's float32 bytes go now rather than with the graph."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
