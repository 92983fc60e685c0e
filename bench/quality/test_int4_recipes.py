"""bench/quality/int4_recipes.py: the 4-bit grids, GPTQ against round-to-nearest, and the scoring, on the
committed tiny export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bench.quality import int4_recipes as recipes

BLOCK = recipes.BLOCK


def rtn(weight: np.ndarray, symmetric: bool) -> np.ndarray:
    """The exporter's int4 round-to-nearest of an [N, K] weight (rows = outputs), as GPTQ's functions take it."""
    return recipes.exported({"w": weight.T.astype(np.float32)}, "rtn", symmetric)["w"].T.astype(np.float64)


def test_offset_keeps_weights_that_lie_on_a_q4_1_grid():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (8, 4 * BLOCK))
    codes[:, ::BLOCK], codes[:, 1::BLOCK] = 0, 15  # every block spans its whole grid
    low = np.repeat(rng.normal(size=(8, 4)), BLOCK, axis=1)
    step = np.repeat(rng.uniform(0.01, 0.1, (8, 4)), BLOCK, axis=1)
    weight = low + step * codes
    stored = recipes.exported({"w": weight.T.astype(np.float32)}, "offset")["w"].T
    assert np.allclose(stored, weight, atol=1e-6)
    assert not np.allclose(rtn(weight, symmetric=False), weight, atol=1e-6)  # integer zero points cannot


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_gives_at_most_16_levels_a_block_on_its_scale(symmetric):
    """The exporter's codes lie on the grid GPTQ chooses (`recipes.grid`), so the two recipes compare like for like."""
    weight = np.random.default_rng(1).normal(size=(5, 3 * BLOCK)).astype(np.float32).astype(np.float64)
    stored = rtn(weight, symmetric)
    for start in range(0, weight.shape[1], BLOCK):
        scale, zero = recipes.grid(weight[:, start : start + BLOCK], symmetric)
        codes = stored[:, start : start + BLOCK] / scale + zero
        assert np.allclose(codes, np.rint(codes), atol=1e-4) and codes.min() >= -1e-4 and codes.max() <= 15 + 1e-4
    if symmetric:  # the value of largest magnitude is kept exactly
        row = np.abs(weight[:, :BLOCK]).argmax(axis=1)
        assert np.allclose(stored[np.arange(5), row], weight[np.arange(5), row], rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_without_correlations_is_round_to_nearest(symmetric):
    weight = np.random.default_rng(2).normal(size=(6, 4 * BLOCK)).astype(np.float32).astype(np.float64)
    assert np.allclose(recipes.gptq(weight, np.eye(weight.shape[1]), symmetric), rtn(weight, symmetric), atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_lowers_the_output_error_on_correlated_inputs(symmetric):
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(16, 4 * BLOCK))
    inputs = rng.normal(size=(512, 8)) @ rng.normal(size=(8, 4 * BLOCK)) + 0.1 * rng.normal(size=(512, 4 * BLOCK))
    hessian = inputs.T @ inputs

    def loss(stored):
        return float(np.sum((inputs @ (weight - stored).T) ** 2))

    assert loss(recipes.gptq(weight, hessian, symmetric)) < 0.5 * loss(rtn(weight, symmetric))


def test_scores_of_the_unchanged_graph_are_perfect_and_recipes_are_scored(llama_export):
    from softprompt.formats.export_folder import open_export

    folder = open_export(llama_export)
    table = np.asarray(folder.table[np.arange(folder.config.vocab_size)], np.float32)
    model = onnx.load(str(folder.file("model")))
    rng = np.random.default_rng(4)
    sequences = [list(rng.integers(3, folder.config.vocab_size, 24)) for _ in range(4)]
    graph = recipes.session(model)
    reference = [graph.run(["logits"], recipes.feeds(graph, table, ids))[0][0].astype(np.float64) for ids in sequences]
    same = recipes.score(model, table, sequences, reference)
    assert same["kl"] < 1e-9 and same["top1"] == 1.0 and same["max_rel"] < 1e-6

    results = recipes.compare(llama_export, sequences[:2], sequences[2:], log=lambda line: None)
    assert list(results) == list(recipes.RECIPES)
    for row in results.values():
        assert row["kl"] > 0 and 0 <= row["top1"] <= 1 and row["max_rel"] > 0


def test_bias_correction_follows_each_product_in_graph_order(llama_export):
    from softprompt.formats.export_folder import open_export

    folder = open_export(llama_export)
    table = np.asarray(folder.table[np.arange(folder.config.vocab_size)], np.float32)
    model = onnx.load(str(folder.file("model")))
    stats = recipes.statistics(model, table, [list(range(3, 27))])
    changed, _ = recipes.apply(model, "rtn+bias", stats, table)
    known = {i.name for i in changed.graph.input} | {t.name for t in changed.graph.initializer} | {""}
    for node in changed.graph.node:
        assert all(name in known for name in node.input), node.name
        known.update(node.output)
    found, head = recipes.products(model)
    assert sum(n.op_type == "Add" and n.input[1].endswith(".bias") for n in changed.graph.node) == len(found) - 1
