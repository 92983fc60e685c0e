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
import dataclasses
import gc
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from softprompt.formats.embedding_table import open_table, quantize_rows
from softprompt.formats.export_folder import CONFIG_FILE, ExportConfig

from . import quality
from .backbone import Backbone, describe, freeze
from .dynamic_int8 import Calibration
from .encoder import EncoderModule, calibration_feeds, export_encoder_graph, uses_token_types, validate_encoder
from .errors import ExportError, ExportValidationError
from .fuse import fuse_for_onnxruntime
from .gguf_weights import gguf_table, index_rows
from .graph import CachedDecoder, export_graph
from .llama_graph import build, read_weights, unsupported
from .precision import (
    GGUF,
    TABLE_PRECISION,
    TOLERANCES,
    Precision,
    apply_precision,
    default_precision,
    for_kind,
)
from .seq2seq import export_seq2seq_graphs, validate_seq2seq
from .sources import BUILTINS, load_source, readable
from .tied_table import table_in_graph
from .validate import Reference, cpu_session, greedy_agreement, reference, validate

GRAPHS = ("auto", "built", "traced")

EXTERNAL_DATA_BYTES = 1 << 30  # above this the weights go to model.onnx.data (protobuf stops at 2 GiB)
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
    log: Callable[[str], None] = print,
) -> ExportConfig:
    """Export `model` (built-in name, .gguf file or Hugging Face folder) into `out_dir`; return its config.

    `kind` ("decoder", "encoder" or "seq2seq") overrides what the model's config says it is.
    `graph` picks how a decoder's graph is made: "built" op by op for the Llama family (fewer,
    fused nodes: faster decoding), "traced" through PyTorch for any architecture, or "auto"
    (built where supported and validated, else traced).
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
        backbone = describe(source)
        stored = gguf_table(backbone.table, gguf_rows) if gguf_rows is not None else None
        table_files = _store_table(backbone.table, staging, TABLE_PRECISION[precision.name], log, stored)
        source.tokenizer.save_pretrained(staging, legacy_format=False)  # tokenizer.json only: all the runtime reads
        info = source.info
        del source  # the backbone holds the model now: a decoder's is released once PyTorch's answers are computed

        def reload():
            return freeze(load_source(model, attention=attention, cache_dir=cache_dir, log=lambda m: None, kind=kind).model)

        precision = for_kind(precision, backbone.kind)
        # a graph that is converted next is written with its weights in a data file, which the conversion reads one
        # weight at a time (a 1 GB model loaded whole for it peaked at 6 GB)
        external = backbone.weight_bytes > EXTERNAL_DATA_BYTES or precision.name != "fp32"
        options = GraphOptions(opset, fp32_tolerance, fuse, graph, external, precision.name != "fp32", reload)
        files, report, want = WRITERS[backbone.kind](backbone, staging, options, step, log)
        files = {**files, **table_files, "tokenizer": "tokenizer.json"}
        table_in_graph = None
        if precision.name != "fp32":
            report = _convert(backbone, staging, files, precision, tolerance, report, want, step, log, gguf_rows)
            files, table_in_graph = _table_from_graph(backbone.table, staging, files, log)

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
            **backbone.fields,
        )
        (staging / CONFIG_FILE).write_text(config.to_json())

        step(f"moving the export into {out}")
        readable(staging)
        _replace_dir(staging, out)
        step("")
        return config
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    """How export-model was asked to make and check the graphs."""

    opset: int
    tolerance: float
    fuse: bool
    graph: str  # decoders: "auto", "built" or "traced"
    external_data: bool  # weights in a .data file beside the graph (above EXTERNAL_DATA_BYTES, or converted next)
    converted: bool  # the graphs are converted to another precision next, and checked again against PyTorch fp32
    reload: Callable[[], Any]  # the PyTorch model again, after it was released (a built graph that falls back to tracing)


def _interface(path: Path) -> dict:
    """The input and output names and the opset of the graph the runtime steps through, as written."""
    written = onnx.load(str(path), load_external_data=False)
    return {
        "input_names": [i.name for i in written.graph.input],
        "output_names": [o.name for o in written.graph.output],
        "opset": next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")),
    }


def _mib(backbone: Backbone) -> str:
    return f"{backbone.weight_bytes / 2**20:.0f} MiB of weights"


def _decoder_graphs(backbone: Backbone, staging: Path, options: GraphOptions, step, log) -> tuple[dict, dict, Reference]:
    """model.onnx built op by op or traced, as `options.graph` asks; returns its files, its validation report and
    PyTorch's answers to every check (the model itself is released before onnxruntime loads the graph)."""
    path = staging / "model.onnx"
    validating = f"validating against PyTorch (tolerance {options.tolerance:g} relative to the logits' scale)"
    reason = unsupported(backbone.model) if options.graph != "traced" else "--graph traced"
    weights = []  # the only reference to them, handed to build(), which lets each go as it is written
    if reason is None:
        try:
            weights.append(read_weights(backbone.model, backbone.layout))
        except ValueError as exc:
            reason = str(exc)
    if options.graph == "built" and not weights:
        raise ExportError(f"--graph built cannot build {type(backbone.model).__name__}: {reason}; use --graph traced")
    files = {"model": "model.onnx"}
    want: Reference | None = None  # computed once: still PyTorch's answers after a fallback reloads the model
    if weights:
        step(f"building the ONNX graph op by op ({_mib(backbone)}, Llama family, fused onnxruntime ops)")
        build(weights.pop(), path, external_data=options.external_data)
        if options.fuse:
            log("      --fuse is for traced graphs; the built graph already uses onnxruntime's fused ops")
        step(validating)
        want = _reference(backbone, options.converted)
        _release(backbone)
        try:
            report = validate(path, want, options.tolerance)
        except ExportValidationError as exc:
            if options.graph == "built":
                raise
            log(f"      the built graph does not match PyTorch, so it is traced instead: {' '.join(str(exc).split())}")
            step.more(2)
            backbone.model = options.reload()
        else:
            _log_report(report, log)
            return files, {**report, "graph": "built"}, want
    if options.graph == "auto" and reason:
        log(f"      graph traced through PyTorch: {reason}")
    step(f"exporting the ONNX graph through PyTorch ({_mib(backbone)}, opset {options.opset}; the longest step)")
    wrapper = CachedDecoder(backbone.model, backbone.layout)
    export_graph(wrapper, backbone.table.shape[1], path, options.opset, external_data=options.external_data)
    del wrapper
    fusions = _fuse(staging, files, options, log)
    step(validating)
    if want is None:
        want = _reference(backbone, options.converted)
    _release(backbone)
    report = validate(path, want, options.tolerance)
    return files, _finish(report, fusions, log, graph="traced"), want


def _reference(backbone: Backbone, converted: bool) -> Reference:
    """PyTorch fp32's answers to the fp32 graph's validation and, for a graph `converted` next, to its checks: greedy
    tokens from GREEDY_TEXTS and logits of quality.QUALITY_TEXTS, each text as the runtime serves it (its special
    tokens, a BOS where the tokenizer adds one), whole and alone."""
    starts: list[list[int]] = []
    rows: list[list[int]] = []
    if converted:
        starts = [backbone.tokenizer.encode(text) for text in GREEDY_TEXTS]
        limit = backbone.facts.get("max_positions") or None  # learned positions cap what a text may be
        rows = [backbone.tokenizer.encode(text)[:limit] for text in quality.QUALITY_TEXTS]
    return reference(CachedDecoder(backbone.model, backbone.layout), backbone.table, starts, rows)


def _release(backbone: Backbone) -> None:
    """Let the PyTorch model go: its weights and those onnxruntime loads next would otherwise be held together."""
    backbone.model = None
    gc.collect()


def _encoder_graphs(backbone: Backbone, staging: Path, options: GraphOptions, step, log) -> tuple[dict, dict, None]:
    """model.onnx from inputs_embeds to the last hidden state (and the pooler's output where there is one)."""
    log(f"      sentence embeddings: {backbone.fields['pooling']} pooling over the text's tokens")
    step(f"exporting the encoder graph ({_mib(backbone)}, opset {options.opset})")
    module = EncoderModule(backbone.model, uses_token_types(backbone.model))
    export_encoder_graph(module, backbone.table.shape[1], staging / "model.onnx", options.opset, options.external_data)
    files = {"model": "model.onnx"}
    fusions = _fuse(staging, files, options, log)
    step(f"validating against PyTorch (tolerance {options.tolerance:g} relative to the hidden states' scale)")
    return files, _finish(validate_encoder(staging / "model.onnx", module, backbone.table, options.tolerance), fusions, log), None


def _seq2seq_graphs(backbone: Backbone, staging: Path, options: GraphOptions, step, log) -> tuple[dict, dict, None]:
    """encoder.onnx (input to cross-attention keys/values) and decoder.onnx (one cached step)."""
    step(f"exporting the encoder and decoder graphs ({_mib(backbone)}, opset {options.opset})")
    export_seq2seq_graphs(backbone.model, staging, options.opset, external_data=options.external_data, layout=backbone.layout)
    files = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
    fusions = _fuse(staging, files, options, log)
    step(f"validating against PyTorch (tolerance {options.tolerance:g} relative to each output's scale)")
    return files, _finish(validate_seq2seq(staging, backbone.model, backbone.table, options.tolerance), fusions, log), None


WRITERS = {"decoder": _decoder_graphs, "encoder": _encoder_graphs, "seq2seq": _seq2seq_graphs}


# Greedy agreement starts from these texts, cut to one length: real text, as the graph will meet.
GREEDY_TEXTS = ("The capital of France is a city that", "Once upon a time, a little robot lived in", "def fibonacci(n):\n    ")


def _store_table(table: np.ndarray, staging: Path, dtype: str, log, stored=None) -> dict[str, str]:
    """embeddings.npy in `dtype` (int8: with embedding_scales.npy, a scale per block of 32), written once; returns
    its files. `stored` (dtype, rows, scales) gives them made already (a GGUF's own blocks). Graphs are validated
    against the float32 table in memory, whatever is stored."""
    dtype, rows, scales = stored if stored is not None else (dtype, *quantize_rows(table, dtype))
    np.save(staging / "embeddings.npy", rows, allow_pickle=False)
    written = {"embeddings": "embeddings.npy"}
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


def _table_from_graph(table: np.ndarray, staging: Path, files: dict[str, str], log) -> tuple[dict[str, str], dict | None]:
    """Where a graph's lm_head became the int8 table (`tied_table.share_table`), drop the table's own files
    and point `embeddings` at the graph's data; the rows read back from there must be the stored table's."""
    for name in [name for name in files.values() if name.endswith(".onnx")]:
        place = table_in_graph(staging / name)
        if place is None:
            continue
        data = f"{name}.data"
        stored = open_table(staging / files["embeddings"], staging / files["embedding_scales"], table.shape)
        shared = open_table(staging / data, None, table.shape, place)
        if not (np.array_equal(shared[:], stored[:])):
            raise ExportError(f"{data}: the lm_head's int8 rows differ from the embedding table's; report this as a bug")
        del stored, shared
        for key in ("embeddings", "embedding_scales"):
            (staging / files[key]).unlink()
        files = {key: value for key, value in files.items() if key != "embedding_scales"} | {"embeddings": data}
        log(f"      the tied lm_head is the int8 embedding table: stored once, in {data}")
        return files, place
    return files, None


def _check_decoder(backbone: Backbone, staging: Path, tolerance: float | None, want: Reference) -> dict:
    """A converted decoder against PyTorch fp32's answers: max logit differences (judged only at a `tolerance` given),
    greedy agreement, and the next-token quality on sample text (quality.py), which refuses only a broken graph."""
    session = cpu_session(staging / "model.onnx")  # loaded once for every check below
    report = validate(session, want, math.inf if tolerance is None else tolerance, caches=False)
    agreed = greedy_agreement(session, want)
    found = quality.measure(session, want)
    if tolerance is None:
        quality.check(found)
    return {**report, "tolerance": tolerance, "greedy_agreement": agreed, "quality": found.record()}


def _check_encoder(backbone: Backbone, staging: Path, tolerance: float | None, want: None) -> dict:
    module = EncoderModule(backbone.model, uses_token_types(backbone.model))
    return validate_encoder(staging / "model.onnx", module, backbone.table, tolerance)


def _check_seq2seq(backbone: Backbone, staging: Path, tolerance: float | None, want: None) -> dict:
    return validate_seq2seq(staging, backbone.model, backbone.table, tolerance)


# Each kind's graphs against PyTorch fp32, again after they were converted to another precision.
CHECKS = {"decoder": _check_decoder, "encoder": _check_encoder, "seq2seq": _check_seq2seq}


def _convert(
    backbone: Backbone,
    staging: Path,
    files: dict[str, str],
    precision: Precision,
    tolerance: float | None,
    fp32: dict,
    want: Reference | None,
    step,
    log,
    gguf_rows=None,
) -> dict:
    """Store the validated fp32 graphs in `precision` and validate them again; returns the new report."""
    what = precision.name
    if precision.quantized:
        what = "int8 weights and activations" if precision.algorithm == "dynamic" else f"weight-only {precision.name}"
    if precision.name == GGUF:
        what = f"the blocks of {gguf_rows.path.name} (4- and 8-bit MatMulNBits)"
    step(
        f"converting the graphs to {what} ({', '.join(f'{k}={v}' for k, v in precision.record().items() if k != 'precision') or 'float16 weights and compute'})"
    )
    graphs = {key: name for key, name in files.items() if name.endswith(".onnx")}
    limit = tolerance if tolerance is not None else precision.tolerance
    calibration = None
    if precision.algorithm == "dynamic" and backbone.kind == "encoder":
        sets = calibration_feeds(backbone.tokenizer, backbone.table, backbone.facts["max_positions"])
        calibration = Calibration(sets, tolerance=limit)
    changes = {
        key: apply_precision(staging / name, precision, backbone.table, calibration, log, gguf_rows)
        for key, name in graphs.items()
    }
    for key, change in changes.items():
        log(
            f"      {graphs[key]}: {change['bytes_fp32'] / 2**20:.1f} MiB -> {change['bytes'] / 2**20:.1f} MiB"
            + "".join(f", {k}: {v}" for k, v in change.items() if not k.startswith("bytes"))
        )
    judged: float | None = limit  # a converted decoder is judged by its next-token quality unless a tolerance was given
    if backbone.kind == "decoder" and tolerance is None:
        judged = None
        broken = ", ".join(f"{name.replace('_', ' ')} over {value:g}" for name, value in quality.BROKEN.items())
        step(f"checking the {precision.name} graph against PyTorch fp32 on sample text (refused only when broken: {broken})")
    else:
        step(f"validating the {precision.name} graphs against PyTorch fp32 (tolerance {limit:g} relative to the outputs' scale)")
    try:
        report = CHECKS[backbone.kind](backbone, staging, judged, want)
    except ExportValidationError as exc:
        instead = (
            "judge by the logits' largest difference instead with --tolerance"
            if judged is None
            else "accept more error with --tolerance"
        )
        raise ExportValidationError(
            f"--precision {precision.name}: {exc}. Keep more weights at higher precision (--keep), use a smaller "
            f"--block-size or another precision, or {instead}"
        ) from None
    _log_report(report, log)
    if "quality" in report:
        found = report["quality"]
        log(
            f"      next-token quality: KL to fp32 {found['kl_mean']:.4f} nats, top-1 agreement {found['top1_agreement']:.1%}, "
            f"perplexity {found['perplexity_fp32']:.2f} -> {found['perplexity']:.2f} ({found['perplexity_ratio'] - 1:+.1%})"
        )
    if "greedy_agreement" in report:
        agreed = report["greedy_agreement"]
        log(f"      greedy tokens equal to PyTorch fp32 before the first difference: {', '.join(map(str, agreed))} (of 16)")
    return {
        **report,
        "fp32": fp32["max_relative_diff"],
        **{k: v for k, v in fp32.items() if k in ("graph", "fusions")},
        "changes": changes,
    }


def _fuse(staging: Path, files: dict[str, str], options: GraphOptions, log) -> dict[str, int] | None:
    """--fuse: rewrite each traced graph with onnxruntime's contrib ops, before it is validated."""
    if not options.fuse:
        return None
    log("      fusing normalisation, rotary embeddings and attention into onnxruntime contrib ops")
    counts = {}
    for key, name in files.items():
        found = fuse_for_onnxruntime(staging / name, options.external_data)
        counts.update({(f"{key}: {fusion}" if len(files) > 1 else fusion): n for fusion, n in found.items()})
    log("      " + (", ".join(f"{name}: {count}" for name, count in counts.items()) or "nothing to fuse"))
    return counts


def _finish(report: dict, fusions: dict[str, int] | None, log, **extra) -> dict:
    _log_report(report, log)
    return {**report, **extra, **({"fusions": fusions} if fusions is not None else {})}


def _log_report(report: dict, log) -> None:
    log("      " + ", ".join(f"{name}: {diff:.1e}" for name, diff in report["max_relative_diff"].items()))


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
