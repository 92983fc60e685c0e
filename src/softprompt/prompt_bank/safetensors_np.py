"""Read tensors from a `.safetensors` file with numpy alone.

`safetensors.numpy` refuses bfloat16, which PEFT adapters are often saved in, and would add a
dependency to the device install; the format is simple enough (an 8-byte header size, a JSON
header, raw little-endian data) to read here and widen bfloat16 to float32 exactly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_safetensors(path: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Return the named tensors (all when `names` is None) as numpy arrays; BF16 becomes float32."""
    path = Path(path)
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 << 20:
            raise ValueError(f"{path}: header of {size} bytes; not a safetensors file")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"{path}: unreadable safetensors header ({type(exc).__name__}: {exc})") from None
        data = handle.read()
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is a {type(header).__name__}; expected an object of tensors")
    header.pop("__metadata__", None)
    wanted = list(header) if names is None else names
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        if name not in header:
            raise KeyError(f"{path}: no tensor {name!r}; tensors there: {sorted(header)}")
        info = header[name]
        _check_entry(path, name, info)
        start, end = info["data_offsets"]
        if end > len(data):
            raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        chunk = data[start:end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif info["dtype"] in _DTYPES:
            array = np.frombuffer(chunk, dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")).copy()
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; expected one of BF16, {', '.join(_DTYPES)}")
        out[name] = array.reshape(info["shape"])
    return out


def _check_entry(path: Path, name: str, info) -> None:
    """A header entry's dtype, shape and offsets, checked against each other before any data is read."""
    sizes = {"BF16": 2, **{key: np.dtype(value).itemsize for key, value in _DTYPES.items()}}
    ok = (
        isinstance(info, dict)
        and info.get("dtype") in sizes
        and isinstance(info.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
        and isinstance(info.get("data_offsets"), list)
        and len(info["data_offsets"]) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in info["data_offsets"])
    )
    if not ok:
        raise ValueError(
            f"{path}: tensor {name!r} is described as {info!r:.120}; expected dtype (BF16, {', '.join(_DTYPES)}), "
            "shape (a list of sizes) and data_offsets [start, end]"
        )
    start, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    if end - start != count * sizes[info["dtype"]]:
        raise ValueError(
            f"{path}: tensor {name!r} of shape {info['shape']} {info['dtype']} needs {count * sizes[info['dtype']]} bytes; "
            f"its offsets give {end - start}"
        )


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise float32/float16 arrays as a `.safetensors` file (what torch's `safetensors` loader reads)."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    chunks, offset = [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in names:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; expected float32 or float16")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)
