"""Each kind's fp32 graphs written into the export's staging folder and validated against PyTorch.

A decoder's graph is built op by op (the Llama family) or traced; PyTorch's answers to every check
of the export (this validation, and the converted graph's checks later) are computed once and the
model released before onnxruntime loads a graph, so their weights are never held together. Encoders
and encoder-decoders are traced and validated with the model at hand.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import quality
from .backbone import Backbone
from .encoder import EncoderModule, export_encoder_graph, uses_token_types, validate_encoder
from .errors import ExportError, ExportValidationError
from .fuse import fuse_for_onnxruntime
from .graph import CachedDecoder, export_graph, optimize_saved
from .llama_graph import build, read_weights, unsupported
from .seq2seq import export_seq2seq_graphs, validate_seq2seq
from .validate import Reference, cpu_session, reference, validate


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    """How export-model was asked to make and check the graphs (each written with its weights in a .data file
    beside it: see export.py)."""

    opset: int
    tolerance: float
    fuse: bool
    graph: str  # decoders: "auto", "built" or "traced"
    converted: bool  # the graphs are converted to another precision next, and checked again against PyTorch fp32
    reload: Callable[[], Any]  # the PyTorch model again, after it was released (a built graph that falls back to tracing)
    kv_cache: str = "shared"  # built decoder graphs: GroupQueryAttention ("shared") or ONNX's Attention ("growing")


def _mib(backbone: Backbone) -> str:
    return f"{backbone.weight_bytes / 2**20:.0f} MiB of weights"


def decoder_graphs(backbone: Backbone, staging: Path, options: GraphOptions, step, log) -> tuple[dict, dict, Reference]:
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
        build(weights.pop(), path, external_data=True, kv_cache=options.kv_cache)
        if options.fuse:
            log("      --fuse is for traced graphs; the built graph already uses onnxruntime's fused ops")
        step(validating)
        want = _reference(backbone, options.converted)
        _release(backbone)
        try:
            report = validate(cpu_session(path, prepack=False), want, options.tolerance)
        except ExportValidationError as exc:
            if options.graph == "built":
                raise
            log(f"      the built graph does not match PyTorch, so it is traced instead: {' '.join(str(exc).split())}")
            step.more(2)
            backbone.model = options.reload()
        else:
            log_report(report, log)
            return files, {**report, "graph": "built"}, want
    if options.graph == "auto" and reason:
        log(f"      graph traced through PyTorch: {reason}")
    step(f"exporting the ONNX graph through PyTorch ({_mib(backbone)}, opset {options.opset}; the longest step)")
    wrapper = CachedDecoder(backbone.model, backbone.layout)
    export_graph(wrapper, backbone.table.shape[1], path, options.opset, external_data=True, optimize=False)
    del wrapper
    if want is None:  # the model's last use: its weights and the graph's are not held together while it is optimised
        want = _reference(backbone, options.converted)
    _release(backbone)
    optimize_saved(path, external_data=True)
    fusions = _fuse(staging, files, options, log)
    step(validating)
    report = validate(cpu_session(path, prepack=False), want, options.tolerance)
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


def encoder_graphs(backbone: Backbone, staging: Path, options: GraphOptions, step, log) -> tuple[dict, dict, None]:
    """model.onnx from inputs_embeds to the last hidden state (and the pooler's output where there is one)."""
    log(f"      sentence embeddings: {backbone.fields['pooling']} pooling over the text's tokens")
    step(f"exporting the encoder graph ({_mib(backbone)}, opset {options.opset})")
    module = EncoderModule(backbone.model, uses_token_types(backbone.model))
    export_encoder_graph(module, backbone.table.shape[1], staging / "model.onnx", options.opset, external_data=True)
    files = {"model": "model.onnx"}
    fusions = _fuse(staging, files, options, log)
    step(f"validating against PyTorch (tolerance {options.tolerance:g} relative to the hidden states' scale)")
    return files, _finish(validate_encoder(staging / "model.onnx", module, backbone.table, options.tolerance), fusions, log), None


def seq2seq_graphs(backbone: Backbone, staging: Path, options: GraphOptions, step, log) -> tuple[dict, dict, None]:
    """encoder.onnx (input to cross-attention keys/values) and decoder.onnx (one cached step)."""
    step(f"exporting the encoder and decoder graphs ({_mib(backbone)}, opset {options.opset})")
    export_seq2seq_graphs(backbone.model, staging, options.opset, external_data=True, layout=backbone.layout)
    files = {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
    fusions = _fuse(staging, files, options, log)
    step(f"validating against PyTorch (tolerance {options.tolerance:g} relative to each output's scale)")
    return files, _finish(validate_seq2seq(staging, backbone.model, backbone.table, options.tolerance), fusions, log), None


WRITERS = {"decoder": decoder_graphs, "encoder": encoder_graphs, "seq2seq": seq2seq_graphs}


# Greedy agreement starts from these texts, cut to one length: real text, as the graph will meet.
GREEDY_TEXTS = ("The capital of France is a city that", "Once upon a time, a little robot lived in", "def fibonacci(n):\n    ")


def _fuse(staging: Path, files: dict[str, str], options: GraphOptions, log) -> dict[str, int] | None:
    """--fuse: rewrite each traced graph with onnxruntime's contrib ops, before it is validated."""
    if not options.fuse:
        return None
    log("      fusing normalisation, rotary embeddings and attention into onnxruntime contrib ops")
    counts = {}
    for key, name in files.items():
        found = fuse_for_onnxruntime(staging / name, external_data=True)
        counts.update({(f"{key}: {fusion}" if len(files) > 1 else fusion): n for fusion, n in found.items()})
    log("      " + (", ".join(f"{name}: {count}" for name, count in counts.items()) or "nothing to fuse"))
    return counts


def _finish(report: dict, fusions: dict[str, int] | None, log, **extra) -> dict:
    log_report(report, log)
    return {**report, **extra, **({"fusions": fusions} if fusions is not None else {})}


def log_report(report: dict, log) -> None:
    log("      " + ", ".join(f"{name}: {diff:.1e}" for name, diff in report["max_relative_diff"].items()))
