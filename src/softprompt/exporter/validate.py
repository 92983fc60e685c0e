"""Checking an exported graph against PyTorch, in optimum's order: names, shapes, then values.

Every case runs both; every mismatch is collected before anything is raised, so one report
shows all that is wrong. Values are compared relative to the reference's scale (max |ref|),
and only at positions the attention mask keeps: padded positions are undefined in both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from .errors import ExportValidationError
from .graph import CachedDecoder, CacheLayout


def cpu_session(graph: Path | ort.InferenceSession, *, prepack: bool = True) -> ort.InferenceSession:
    """A CPU session of the graph at a path, or the session given: a check that runs several comparisons loads the
    graph once.

    `prepack=False` for a float32 graph checked by a few runs: onnxruntime otherwise keeps a packed copy of every
    MatMul weight beside the mapped data file, the weights twice in memory (Gemma-3-270m: +1 GB) for a handful of
    products computed the same way. A quantized graph keeps its prepacking: MatMulNBits computes through its packed
    weights, and its check must run the graph as the runtime does."""
    if isinstance(graph, ort.InferenceSession):
        return graph
    options = ort.SessionOptions()
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: one scale for every output, whatever its magnitude."""
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-6))


def passed(diffs: dict[str, float], tolerance: float) -> dict:
    """The validation report for `diffs`, or ExportValidationError naming each one above `tolerance`."""
    failed = {name: d for name, d in diffs.items() if not d <= tolerance}  # `not <=` catches NaN
    if failed:
        raise ExportValidationError(
            "the ONNX graph does not reproduce PyTorch: "
            + ", ".join(f"{name} differ(s) by {d:.2e} of the reference's scale" for name, d in failed.items())
            + f" (tolerance {tolerance:g})"
        )
    return {"max_relative_diff": diffs, "tolerance": tolerance}


@dataclasses.dataclass
class Case:
    name: str
    embeds: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    past: list[np.ndarray]


def make_cases(wrapper: CachedDecoder, table: np.ndarray, seed: int = 0) -> list[Case]:
    """A left-padded first step with no past, then 1 and 3 new tokens on top of its real cache."""
    rng = np.random.default_rng(seed)
    layout = wrapper.layout

    def embeds(batch: int, seq: int) -> np.ndarray:
        return np.asarray(table[rng.integers(0, table.shape[0], (batch, seq))], dtype=np.float32)

    def positions(mask: np.ndarray, past: int) -> np.ndarray:
        pos = np.cumsum(mask, -1) - 1
        return np.where(mask == 0, 1, pos)[:, past:].astype(np.int64)

    batch, first = 2, 6
    mask0 = np.ones((batch, first), np.int64)
    mask0[1, :2] = 0  # the second row is left-padded by two positions
    empty = [np.zeros((batch, heads, 0, size), np.float32) for heads, size in layout.shapes for _ in range(2)]
    cases = [Case("first step, no past", embeds(batch, first), mask0, positions(mask0, 0), empty)]
    with torch.no_grad():
        out = wrapper(*_torch_args(cases[0]))
    past = [t.numpy() for t in out[1:]]
    for new in (1, 3):
        mask = np.concatenate([mask0, np.ones((batch, new), np.int64)], 1)
        cases.append(Case(f"{new} new token(s), past of {first}", embeds(batch, new), mask, positions(mask, first), past))
    return cases


def _torch_args(case: Case):
    return (
        torch.from_numpy(case.embeds),
        torch.from_numpy(case.mask),
        torch.from_numpy(case.positions),
        tuple(torch.from_numpy(p) for p in case.past),
    )


def graph_feeds(case: Case, layout, inputs: set[str], keep: int) -> dict[str, np.ndarray]:
    """`case` as the graph's feeds, only those among its `inputs` (a traced graph takes no `logits_to_keep`, some no
    `position_ids`); `keep`: logits of the last `keep` positions, 0 for all."""
    feeds = {
        "inputs_embeds": case.embeds,
        "attention_mask": case.mask,
        "position_ids": case.positions,
        "logits_to_keep": np.array([keep], np.int64),
        **dict(zip(layout.input_names(), case.past)),
    }
    return {k: v for k, v in feeds.items() if k in inputs}


def torch_outputs(wrapper: CachedDecoder, case: Case) -> list[np.ndarray]:
    """PyTorch's logits and present keys and values for `case`."""
    with torch.no_grad():
        return [t.numpy() for t in wrapper(*_torch_args(case))]


@dataclasses.dataclass
class Reference:
    """PyTorch fp32's answers to every check of a decoder's graphs, computed before any graph runs.

    With the answers in hand the PyTorch model can be released before onnxruntime loads a graph: both
    at once held the weights twice (a 0.5B model's export peaked at 2.4x its weights while validating).
    """

    table: np.ndarray  # [V, E] float32: what every case's embeddings are rows of
    layout: CacheLayout
    cases: list[Case]  # validate(): a first step, then new tokens on its cache
    outputs: list[list[np.ndarray]]  # PyTorch's logits and present keys and values, per case
    starts: list[list[int]] = dataclasses.field(default_factory=list)  # greedy_agreement(): token ids, one text each
    greedy: list[np.ndarray] = dataclasses.field(default_factory=list)  # PyTorch's greedy tokens from each start
    rows: list[list[int]] = dataclasses.field(default_factory=list)  # quality.measure(): sample texts' token ids
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)  # PyTorch's logits [T, V] for each row


def reference(
    wrapper: CachedDecoder,
    table: np.ndarray,
    starts: Sequence[Sequence[int]] = (),
    rows: Sequence[Sequence[int]] = (),
    new_tokens: int = 16,
) -> Reference:
    """What PyTorch gives for validate()'s cases, and, where asked, the greedy tokens from each of `starts` and the
    logits of each of `rows` read whole (the quantized checks')."""
    layout = wrapper.layout
    cases = make_cases(wrapper, table)

    def torch_step(embeds, mask, positions, past):
        logits, *present = torch_outputs(wrapper, Case("", embeds, mask, positions, past))
        return logits, present

    return Reference(
        table=table,
        layout=layout,
        cases=cases,
        outputs=[torch_outputs(wrapper, case) for case in cases],
        starts=[list(map(int, ids)) for ids in starts],
        greedy=[_greedy(torch_step, table, layout, [list(ids)], new_tokens)[0] for ids in starts],
        rows=[list(map(int, ids)) for ids in rows],
        logits=[torch_outputs(wrapper, whole_text(ids, table, layout))[0][0] for ids in rows],
    )


def whole_text(ids: Sequence[int], table: np.ndarray, layout: CacheLayout) -> Case:
    """One text's token ids read whole, from no past."""
    length = len(ids)
    return Case(
        "sample text",
        np.asarray(table[np.asarray(ids)], np.float32)[None],
        np.ones((1, length), np.int64),
        np.arange(length, dtype=np.int64)[None],
        [np.zeros((1, heads, 0, size), np.float32) for heads, size in layout.shapes for _ in range(2)],
    )


def validate(graph: Path | ort.InferenceSession, want: Reference, tolerance: float = 1e-4, caches: bool = True) -> dict:
    """Run every case on onnxruntime (CPU) against PyTorch's answers; raise with all mismatches, else return the worst
    diffs.

    `caches=False` compares the logits only: a quantized graph's keys and values drift by more than
    its logits, and what they do to the text shows in the later cases' logits, which are compared.
    """
    layout = want.layout
    session = cpu_session(graph)
    expected_out = ["logits", *layout.output_names()]
    problems: list[str] = []
    got_out = [o.name for o in session.get_outputs()]
    if got_out != expected_out:
        problems.append(f"output names {got_out[:4]}... differ from {expected_out[:4]}...")
    graph_inputs = {i.name for i in session.get_inputs()}
    missing = {"inputs_embeds", "attention_mask", *layout.input_names()} - graph_inputs
    if missing:
        problems.append(f"graph inputs are missing {sorted(missing)}")
    if problems:
        raise ExportValidationError("export does not match the expected interface: " + "; ".join(problems))

    worst: dict[str, float] = {}
    for case, ref in zip(want.cases, want.outputs):
        got = session.run(expected_out, graph_feeds(case, layout, graph_inputs, keep=0))
        new_mask = case.mask[:, -case.embeds.shape[1] :].astype(bool)
        key_mask = case.mask.astype(bool)
        worst[case.name] = 0.0
        for name, g, r in zip(expected_out, got, ref):
            if name != "logits" and not caches:
                continue
            if g.shape != r.shape:
                problems.append(f"{case.name}: {name} has shape {g.shape}, PyTorch gives {r.shape}")
                continue
            # Compare only kept positions: logits at real new tokens, cache entries at real keys.
            keep_g, keep_r = (
                (g[new_mask], r[new_mask])
                if name == "logits"
                else (g.transpose(0, 2, 1, 3)[key_mask], r.transpose(0, 2, 1, 3)[key_mask])
            )
            if not np.isfinite(keep_g).all():
                problems.append(f"{case.name}: {name} has non-finite values")
                continue
            diff = relative_diff(keep_g, keep_r)
            worst[case.name] = max(worst[case.name], diff)
            if diff > tolerance:
                problems.append(f"{case.name}: {name} max |diff| / max |ref| = {diff:.2e} > {tolerance:g}")
    if problems:
        raise ExportValidationError(
            f"the ONNX graph does not reproduce PyTorch ({len(problems)} mismatches): " + "; ".join(problems)
        )
    return {"tolerance": tolerance, "max_relative_diff": worst}


def greedy_agreement(graph: Path | ort.InferenceSession, want: Reference) -> list[int]:
    """How many greedy tokens the graph gives from each of `want.starts` before it first departs from PyTorch fp32.

    Each side decodes on its own (through its own KV cache) from the same start, each text alone as
    it is served, so a quantized graph is judged by the text it would write, not by one step.
    """
    session = cpu_session(graph)
    inputs = {i.name for i in session.get_inputs()}
    layout = want.layout

    def onnx_step(embeds, mask, positions, past):
        logits, *present = session.run(None, graph_feeds(Case("", embeds, mask, positions, past), layout, inputs, keep=1))
        return logits, present

    agreed = []
    for ids, expected in zip(want.starts, want.greedy):
        got = _greedy(onnx_step, want.table, layout, [ids], len(expected))[0]
        same = got == expected
        agreed.append(int(same.argmin()) if not same.all() else len(expected))
    return agreed


def _greedy(step, table: np.ndarray, layout: CacheLayout, starts: list[list[int]], new_tokens: int) -> np.ndarray:
    """[rows, new_tokens] greedy tokens from `starts` (rows of equal length) through `step`'s own KV cache."""
    rows = len(starts)
    ids = np.asarray(starts, np.int64)
    past = [np.zeros((rows, heads, 0, size), np.float32) for heads, size in layout.shapes for _ in range(2)]
    chosen = []
    for _ in range(new_tokens):
        length = past[0].shape[2] + ids.shape[1]
        mask = np.ones((rows, length), np.int64)
        positions = np.tile(np.arange(length - ids.shape[1], length), (rows, 1))
        logits, past = step(np.asarray(table[ids], np.float32), mask, positions, past)
        ids = logits[:, -1].argmax(-1)[:, None]
        chosen.append(ids[:, 0])
    return np.stack(chosen, 1)
