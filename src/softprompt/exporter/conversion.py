"""A validated fp32 export's graphs stored in another precision and checked again against PyTorch fp32.

A converted decoder is judged by its next-token quality on sample text (quality.py) unless a
tolerance is given; encoders and encoder-decoders by their outputs' largest difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from softprompt.formats.embedding_table import TableFile, equal_rows, open_table

from . import quality
from .backbone import Backbone
from .dynamic_int8 import Calibration
from .encoder import EncoderModule, calibration_feeds, uses_token_types, validate_encoder
from .errors import ExportError, ExportValidationError
from .graph_writers import log_report
from .precision import GGUF, Precision, apply_precision
from .seq2seq import validate_seq2seq
from .tied_table import table_in_graph
from .validate import Reference, cpu_session, greedy_agreement, validate


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


def convert(
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
    # read from its file a slice at a time where it has one: passes over a mapped table leave all of it resident
    table = TableFile(Path(backbone.table.filename)) if isinstance(backbone.table, np.memmap) else backbone.table
    changes = {
        key: apply_precision(staging / name, precision, table, calibration, log, gguf_rows) for key, name in graphs.items()
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
    log_report(report, log)
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


def table_from_graph(
    table: np.ndarray | TableFile, staging: Path, files: dict[str, str], log
) -> tuple[dict[str, str], dict | None]:
    """Where a graph's lm_head became the int8 table (`tied_table.share_table`), drop the table's own files
    and point `embeddings` at the graph's data; the rows read back from there must be the stored table's."""
    for name in [name for name in files.values() if name.endswith(".onnx")]:
        place = table_in_graph(staging / name)
        if place is None:
            continue
        data = f"{name}.data"
        stored = open_table(staging / files["embeddings"], staging / files["embedding_scales"], table.shape)
        shared = open_table(staging / data, None, table.shape, place)
        # a slice at a time (read whole, both were float32: 1.3 GB for Gemma); rows shared with a factor are the
        # model's table exactly (a GGUF's own blocks), where the stored file was its nearest int8 form
        want, what = (table, "the model's table") if "factor" in place else (stored, "the stored int8 table")
        if not equal_rows(shared, want):
            raise ExportError(f"{data}: the lm_head's int8 rows differ from {what}; report this as a bug")
        del stored, shared
        for key in ("embeddings", "embedding_scales"):
            (staging / files[key]).unlink()
        files = {key: value for key, value in files.items() if key != "embedding_scales"} | {"embeddings": data}
        times = f" (the table is its rows times {place['factor']:.6g})" if "factor" in place else ""
        log(f"      the tied lm_head is the int8 embedding table{times}: stored once, in {data}")
        return files, place
    return files, None
