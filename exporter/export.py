"""`export_model`: one call from a model name to a validated export folder.

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

from softprompt.formats.export_folder import CONFIG_FILE, ExportConfig
from softprompt.formats.fingerprint import backbone_fingerprint

from .encoder import (
    EncoderGraph,
    encoder_facts,
    encoder_tokens,
    export_encoder_graph,
    sentence_pooling,
    uses_token_types,
    validate_encoder,
)
from .errors import ExportError, ExportValidationError
from .fuse import fuse_for_onnxruntime
from .graph import CachedDecoder, export_graph, probe_cache
from .llama_graph import build, read_weights, unsupported
from .metadata import embedding_table, special_tokens, structural
from .seq2seq import (
    check_shared_embeddings,
    cross_layout,
    export_seq2seq_graphs,
    generation_tokens,
    seq2seq_facts,
    validate_seq2seq,
)
from .sources import load_source
from .validate import validate

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
    tolerance: float = 1e-4,
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
    """
    if graph not in GRAPHS:
        raise ExportError(f"graph must be one of {', '.join(GRAPHS)}, not {graph!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another folder or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's owner-only mode would follow the folder into place
    step = _steps(log)
    try:
        step(f"loading {model}")
        source = load_source(model, attention=attention, cache_dir=cache_dir, log=lambda m: log(f"      {m}"), kind=kind)
        torch_model = source.model
        for parameter in torch_model.parameters():
            parameter.requires_grad_(False)
        if source.kind in ("encoder", "seq2seq"):
            export = _export_encoder if source.kind == "encoder" else _export_seq2seq
            config = export(source, staging, opset, tolerance, fuse, step, log)
            step(f"moving the export into {out}")
            _replace_dir(staging, out)
            step("")
            return config

        step("writing the embedding table and tokenizer")
        layout = probe_cache(torch_model)
        table = embedding_table(torch_model)
        np.save(staging / "embeddings.npy", table, allow_pickle=False)
        source.tokenizer.save_pretrained(staging, legacy_format=False)  # tokenizer.json only: all the runtime reads
        facts = structural(torch_model, layout, table)
        fingerprint = backbone_fingerprint(table, facts)

        size = sum(p.numel() * p.element_size() for p in torch_model.parameters())
        wrapper = CachedDecoder(torch_model, layout)
        report = _decoder_graph(wrapper, table, staging / "model.onnx", graph, opset, tolerance, fuse,
                                size, step, log)

        step("writing softprompt.json")
        written_model = onnx.load(str(staging / "model.onnx"), load_external_data=False)
        written = written_model.graph
        config = ExportConfig(
            kind="decoder",
            **facts,
            **special_tokens(torch_model, source.tokenizer),
            input_names=[i.name for i in written.input],
            output_names=[o.name for o in written.output],
            opset=next(o.version for o in written_model.opset_import if o.domain in ("", "ai.onnx")),
            dtype="float32",
            fingerprint=fingerprint,
            files={"model": "model.onnx", "embeddings": "embeddings.npy", "tokenizer": "tokenizer.json"},
            source=source.info,
            validation=report,
        )
        (staging / CONFIG_FILE).write_text(config.to_json())

        step(f"moving the export into {out}")
        _replace_dir(staging, out)
        step("")
        return config
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _decoder_graph(wrapper: CachedDecoder, table: np.ndarray, path: Path, graph: str, opset: int, tolerance: float,
                   fuse: bool, size: int, step, log) -> dict:
    """Write and validate the decoder graph the way `graph` asks; returns the validation report."""
    model, large = wrapper.model, size > EXTERNAL_DATA_BYTES
    reason = unsupported(model) if graph != "traced" else "--graph traced"
    weights = None
    if reason is None:
        try:
            weights = read_weights(model, wrapper.layout)
        except ValueError as exc:
            reason = str(exc)
    if graph == "built" and weights is None:
        raise ExportError(f"--graph built cannot build {type(model).__name__}: {reason}; use --graph traced")
    if weights is not None:
        step(f"building the ONNX graph op by op ({size / 2**20:.0f} MiB of weights, Llama family, fused onnxruntime ops)")
        build(weights, path, external_data=large)
        if fuse:
            log("      --fuse is for traced graphs; the built graph already uses onnxruntime's fused ops")
        step(f"validating against PyTorch (tolerance {tolerance:g} relative to the logits' scale)")
        try:
            report = validate(path, wrapper, table, tolerance)
        except ExportValidationError as exc:
            if graph == "built":
                raise
            log(f"      the built graph does not match PyTorch, so it is traced instead: {' '.join(str(exc).split())}")
            step.more(2)
        else:
            _log_report(report, log)
            return {**report, "graph": "built"}
    if graph == "auto" and reason:
        log(f"      graph traced through PyTorch: {reason}")
    step(f"exporting the ONNX graph through PyTorch ({size / 2**20:.0f} MiB of weights, opset {opset}; the longest step)")
    export_graph(wrapper, table.shape[1], path, opset, external_data=large)
    fusions = None
    if fuse:
        log("      fusing normalisation, rotary embeddings and attention into onnxruntime contrib ops")
        fusions = fuse_for_onnxruntime(path, external_data=large)
        log("      " + (", ".join(f"{name}: {count}" for name, count in fusions.items()) or "nothing to fuse"))
    step(f"validating against PyTorch (tolerance {tolerance:g} relative to the logits' scale)")
    report = validate(path, wrapper, table, tolerance)
    _log_report(report, log)
    report["graph"] = "traced"
    if fusions is not None:
        report["fusions"] = fusions
    return report


def _log_report(report: dict, log) -> None:
    log("      " + ", ".join(f"{name}: {diff:.1e}" for name, diff in report["max_relative_diff"].items()))


def _export_encoder(source, staging: Path, opset: int, tolerance: float, fuse: bool, step, log) -> ExportConfig:
    """The encoder path: embeddings, graph to the last hidden state, validation, softprompt.json."""
    model = source.model
    step("writing the embedding table and tokenizer")
    table = embedding_table(model)
    np.save(staging / "embeddings.npy", table, allow_pickle=False)
    source.tokenizer.save_pretrained(staging, legacy_format=False)
    facts = encoder_facts(model, table)
    pooling = sentence_pooling(Path(source.info["path"]) if source.info.get("path") else None)
    log(f"      sentence embeddings: {pooling} pooling over the text's tokens")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    step(f"exporting the encoder graph ({size / 2**20:.0f} MiB of weights, opset {opset})")
    graph = EncoderGraph(model, uses_token_types(model))
    inputs = export_encoder_graph(graph, table.shape[1], staging / "model.onnx", opset, external_data=size > EXTERNAL_DATA_BYTES)
    fusions = fuse_for_onnxruntime(staging / "model.onnx", size > EXTERNAL_DATA_BYTES) if fuse else None
    step(f"validating against PyTorch (tolerance {tolerance:g} relative to the hidden states' scale)")
    report = validate_encoder(staging / "model.onnx", graph, table, tolerance)
    _log_report(report, log)
    if fusions is not None:
        report["fusions"] = fusions
    step("writing softprompt.json")
    config = ExportConfig(
        kind="encoder", **facts, **encoder_tokens(source.tokenizer), input_names=inputs,
        output_names=graph.output_names, opset=opset, dtype="float32", pooling=pooling,
        fingerprint=backbone_fingerprint(table, facts),
        files={"model": "model.onnx", "embeddings": "embeddings.npy", "tokenizer": "tokenizer.json"},
        source=source.info, validation=report,
    )
    (staging / CONFIG_FILE).write_text(config.to_json())
    return config


def _export_seq2seq(source, staging: Path, opset: int, tolerance: float, fuse: bool, step, log) -> ExportConfig:
    """The encoder-decoder path: one table for both sides, encoder.onnx, decoder.onnx, validation, softprompt.json."""
    model = source.model
    step("writing the embedding table and tokenizer")
    table = embedding_table(model)
    check_shared_embeddings(model, table)
    np.save(staging / "embeddings.npy", table, allow_pickle=False)
    source.tokenizer.save_pretrained(staging, legacy_format=False)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    step(f"exporting the encoder and decoder graphs ({size / 2**20:.0f} MiB of weights, opset {opset})")
    large = size > EXTERNAL_DATA_BYTES
    layout = cross_layout(model)
    graph_names = export_seq2seq_graphs(model, staging, opset, external_data=large, layout=layout)
    fusions = None
    if fuse:
        fusions = {f"{part}: {name}": count for part in ("encoder", "decoder")
                   for name, count in fuse_for_onnxruntime(staging / f"{part}.onnx", large).items()}
    step(f"validating against PyTorch (tolerance {tolerance:g} relative to each output's scale)")
    report = validate_seq2seq(staging, model, table, tolerance)
    _log_report(report, log)
    if fusions is not None:
        report["fusions"] = fusions
    step("writing softprompt.json")
    facts = seq2seq_facts(model, table, layout[0])
    tokens = generation_tokens(model, source.tokenizer)
    forced = {key: tokens.pop(key) for key in ("forced_bos_token_id", "forced_eos_token_id")}
    generation = {key: int(value) for key, value in forced.items() if value is not None}
    config = ExportConfig(
        kind="seq2seq", **facts, **tokens, input_names=graph_names["decoder_inputs"],
        output_names=graph_names["decoder_outputs"], opset=opset, dtype="float32",
        fingerprint=backbone_fingerprint(table, facts),
        files={"encoder": "encoder.onnx", "decoder": "decoder.onnx", "embeddings": "embeddings.npy",
               "tokenizer": "tokenizer.json"},
        source=source.info, validation=report, generation=generation,
    )
    (staging / CONFIG_FILE).write_text(config.to_json())
    return config


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
