"""`export_model`: one call from a model name to a validated export folder.

Every kind of model goes through the same stages: load, describe (embedding table, facts,
tokens: `backbone.describe`), write the graphs and validate them against PyTorch (the one
kind-specific stage: `WRITERS`), write `softprompt.json`, move into place.

The folder is built under a hidden temporary name beside OUT_DIR and renamed into place only
after validation passed, so a failed or interrupted export never leaves a half-written folder
and never destroys a previous good one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from softprompt.formats.embedding_table import TableFile, quantize_rows
from softprompt.formats.export_folder import CONFIG_FILE, KV_CACHES, ExportConfig

from .backbone import describe, freeze
from .conversion import convert, table_from_graph
from .errors import ExportError
from .genai_layout import write_genai_layout
from .gguf_weights import gguf_table, index_rows
from .graph_writers import WRITERS, GraphOptions
from .precision import (
    GGUF,
    TABLE_PRECISION,
    TOLERANCES,
    Precision,
    default_precision,
    for_kind,
)
from .sources import BUILTINS, load_source, readable

GRAPHS = ("auto", "built", "traced")

STEPS = 6


def _steps(log: Callable[[str], None]):
    """Number and time the export's stages, so a two-minute export shows where it is."""
    state = {"n": 0, "t": time.perf_counter(), "total": STEPS}

    def step(label: str) -> None:
        now = time.perf_counter()
        if state["n"]:
            log(f"      done in {now - state['t']:.1f} s")
        state["n"] += 1
        state["t"] = now
        if label:
            log(f"[{state['n']}/{state['total']}] {label}")

    def more(n: int) -> None:
        """A stage turned out to need `n` more steps (a fallback)."""
        state["total"] += n

    step.more = more
    return step


def export_model(
    model: str,
    out_dir: str | os.PathLike,
    *,
    opset: int = 18,
    tolerance: float | None = None,
    precision: Precision | str = "fp32",
    overwrite: bool = False,
    attention: str | None = None,
    fuse: bool = False,
    cache_dir: Path | None = None,
    kind: str | None = None,
    graph: str = "auto",
    kv_cache: str | None = None,
    log: Callable[[str], None] = print,
) -> ExportConfig:
    """Export `model` (built-in name, .gguf file or Hugging Face folder) into `out_dir`; return its config.

    `kind` ("decoder", "encoder" or "seq2seq") overrides what the model's config says it is.
    `graph` picks how a decoder's graph is made: "built" op by op for the Llama family (fewer,
    fused nodes: faster decoding), "traced" through PyTorch for any architecture, or "auto"
    (built where supported and validated, else traced).
    `kv_cache` ("shared" or "growing"; default: growing for fp16, which is for CUDA, else shared) picks a built
    graph's attention: GroupQueryAttention, whose cache the runtime keeps in one buffer written in place, or ONNX's
    Attention (see llama_graph.py).
    `precision` ("fp32", "fp16", "int8", "int4", or a Precision with its settings) is what the
    graphs are stored in: made and validated in fp32 first, then converted and checked again
    against PyTorch fp32: a decoder by its next-token quality on sample text (quality.py: KL, top-1
    agreement, perplexity; refused only when broken) unless `tolerance` is given, then by its
    logits' largest difference; encoders and encoder-decoders at `tolerance` (default: the
    precision's own, `Precision.tolerance`).
    """
    precision = default_precision(precision) if isinstance(precision, str) else precision
    fp32_tolerance = tolerance if tolerance is not None and precision.name == "fp32" else TOLERANCES["fp32"]
    if graph not in GRAPHS:
        raise ExportError(f"graph must be one of {', '.join(GRAPHS)}, not {graph!r}")
    if kv_cache is None:  # fp16 is for CUDA, --web for onnxruntime-web: neither has the shared cache's attention
        kv_cache = "growing" if precision.name == "fp16" or precision.web else "shared"
    if kv_cache not in KV_CACHES:
        raise ExportError(f"kv_cache must be one of {', '.join(KV_CACHES)}, not {kv_cache!r}")
    if precision.name == GGUF and not _names_gguf(model):
        raise ExportError(_NOT_GGUF.format(model=model))
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another folder or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    step = _steps(log)
    if precision.name != "fp32":
        step.more(3 if precision.name == GGUF else 2)
    try:
        step(f"loading {model}")
        source = load_source(model, attention=attention, cache_dir=cache_dir, log=lambda m: log(f"      {m}"), kind=kind)

        gguf_rows = _gguf_rows(source, model, step) if precision.name == GGUF else None
        step("writing the embedding table and tokenizer")
        dtype = TABLE_PRECISION[precision.name] if gguf_rows is None else GGUF
        # the float32 table is written as it is made and read back mapped (the checks read only the rows of their
        # sample ids): where it is what is stored, as embeddings.npy, else beside it until the folder moves into place
        table_path = staging / ("embeddings.npy" if dtype == "fp32" else TABLE_SCRATCH)
        backbone = describe(source, table_path)
        source.tokenizer.save_pretrained(staging, legacy_format=False)  # tokenizer.json only: all the runtime reads
        info = source.info
        del source  # the backbone holds the model now: a decoder's is released once PyTorch's answers are computed

        def reload():
            return freeze(load_source(model, attention=attention, cache_dir=cache_dir, log=lambda m: None, kind=kind).model)

        precision = for_kind(precision, backbone.kind)
        # Every graph keeps its weights in a data file beside it: a conversion reads them one at a time (a 1 GB model
        # loaded whole for it peaked at 6 GB), and onnxruntime maps the file and keeps only its packed copies of the
        # weights, where a graph with its weights inside was parsed into memory whole and kept beside them (the
        # default model at fp32: the runtime's peak 842 -> 714 MB at the same speed)
        options = GraphOptions(opset, fp32_tolerance, fuse, graph, precision.name != "fp32", reload, kv_cache)
        files, report, want = WRITERS[backbone.kind](backbone, staging, options, step, log)
        # stored once a decoder's model is released: the int8 rows and a GGUF's blocks take a pass over the whole table
        table_files = _store_table(backbone.table, table_path, dtype, log, gguf_rows)
        files = {**files, **table_files, "tokenizer": "tokenizer.json"}
        table_in_graph = None
        if precision.name != "fp32":
            report = convert(backbone, staging, files, precision, tolerance, report, want, step, log, gguf_rows)
            files, table_in_graph = table_from_graph(backbone.table, staging, files, log)

        step("writing softprompt.json")
        config = ExportConfig(
            kind=backbone.kind,
            **backbone.facts,
            **backbone.tokens,
            **_interface(staging / files["decoder" if backbone.kind == "seq2seq" else "model"]),
            dtype="float32",
            fingerprint=backbone.fingerprint,
            files=files,
            source=info,
            validation=report,
            precision=precision.name,
            quantization=precision.record() if precision.quantized else {},
            table_in_graph=table_in_graph,
            kv_cache=kv_cache if report.get("graph") == "built" else None,
            **backbone.fields,
        )
        (staging / CONFIG_FILE).write_text(config.to_json())
        if backbone.kind == "decoder":
            write_genai_layout(staging)  # 0.1-0.3 MB: the decoder behind ids, for onnxruntime-genai's native loop

        step(f"moving the export into {out}")
        del backbone, want  # they map the table, and a mapped file cannot be removed or moved on every system
        (staging / TABLE_SCRATCH).unlink(missing_ok=True)
        readable(staging)
        _replace_dir(staging, out)
        step("")
        return config
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _interface(path: Path) -> dict:
    """The input and output names and the opset of the graph the runtime steps through, as written."""
    written = onnx.load(str(path), load_external_data=False)
    return {
        "input_names": [i.name for i in written.graph.input],
        "output_names": [o.name for o in written.graph.output],
        "opset": next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")),
    }


TABLE_SCRATCH = ".table.float32.npy"  # the float32 table beside a smaller stored one, while the graphs are checked


def _store_table(table: np.ndarray, path: Path, dtype: str, log, gguf_rows=None) -> dict[str, str]:
    """embeddings.npy in `dtype` (int8: with embedding_scales.npy, a scale per block of 32) beside the float32
    `table` mapped from `path`, written once; returns its files. "gguf": a GGUF's own blocks where they hold
    the table (`gguf_table`). Graphs are validated against the float32 table, whatever is stored."""
    written = {"embeddings": "embeddings.npy"}
    if dtype == "fp32":  # written already, as the table was made
        return written
    if dtype == GGUF:  # through a mapping of its own, closed after: the pages its passes touched go with it
        dtype, rows, scales = gguf_table(np.load(path, mmap_mode="r", allow_pickle=False), gguf_rows)
    else:  # read from the file a slice at a time: a pass through the mapping would leave all of it resident
        rows, scales = quantize_rows(TableFile(path), dtype)
    staging = path.parent
    np.save(staging / "embeddings.npy", rows, allow_pickle=False)
    if scales is not None:
        np.save(staging / "embedding_scales.npy", scales, allow_pickle=False)
        written["embedding_scales"] = "embedding_scales.npy"
    if dtype != "fp32":
        size = sum((staging / name).stat().st_size for name in written.values())
        log(f"      embedding table: {table.nbytes / 2**20:.1f} MiB float32 -> {size / 2**20:.1f} MiB {dtype}")
    return written


_NOT_GGUF = (
    "--precision gguf stores a GGUF file's own blocks; {model} is not a .gguf file (its weights are float: "
    "use --precision int8 or int4)"
)


def _names_gguf(model: str) -> bool:
    """Whether `model` is a .gguf file or a built-in model that ships as one (checked before anything loads)."""
    builtin = BUILTINS.get(str(model))
    return str(builtin.filename if builtin else model).lower().endswith(".gguf")


def _gguf_rows(source, model: str, step):
    """--precision gguf: every row of the source GGUF's quantized tensors, indexed (`gguf_weights.index_rows`)."""
    path = source.info.get("gguf")
    if path is None:
        raise ExportError(_NOT_GGUF.format(model=model))
    from tqdm.auto import tqdm

    step(f"indexing the rows of {Path(path).name}'s quantized tensors, to find each weight's own blocks")
    return index_rows(
        Path(path),
        progress=lambda items, total: tqdm(items, desc="tensors", unit="tensor", total=total, leave=False, disable=None),
    )


def _replace_dir(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
