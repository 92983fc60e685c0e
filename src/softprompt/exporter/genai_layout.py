"""The export in onnxruntime-genai's layout, beside the runtime's own: `model.genai.onnx` and `genai_config.json`.

onnxruntime-genai runs the whole decode loop natively (the step, the cache, the search) but feeds a
graph token ids, not embeddings. `model.genai.onnx` is the export's decoder behind a small graph that
turns ids into the rows the runtime would feed: an id below the vocabulary is that row of the export's
own table (read as the runtime reads it, bit for bit: int8 codes times their scales, float16 cast, or
float32), and an id at or above it, V + i, is row i of the `soft_prompts` input. A prompt-tuned task
is then its P rows set once (`Generator.set_model_input("soft_prompts", rows)`) and the ids V..V+P-1
put before the text's; a caller without a task sets one zero row (onnxruntime-genai feeds only the
inputs a session lists, so the input can have no default). Nothing is copied: the table's initializers
point into the files that already hold it (embeddings.npy after its header, or the tied lm_head's bytes
in model.onnx.data), and the decoder's weights are model.onnx.data itself. Where the graph takes `logits_to_keep`,
it is fixed at 1 and the logits' shape says one position: onnxruntime-genai then takes the prefill's last
position's logits as they come ("trimmed prefill logits") instead of binding, and the lm_head computing, a
buffer for every prompt position (16 MB of peak memory on SmolLM2-135M at 22 ids). A graph without it gives
every position's logits, and genai picks the last.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from softprompt.formats.atomic import write_atomic
from softprompt.formats.embedding_table import BLOCK
from softprompt.formats.export_folder import GENAI_CONFIG, GENAI_GRAPH, ExportConfig, read_config

from .errors import ExportError
from .lazy_weights import external_reference

PROMPTS = "soft_prompts"
_EMBEDS = "inputs_embeds"


def write_genai_layout(folder: str | Path) -> list[Path]:
    """Write `model.genai.onnx` and `genai_config.json` into the decoder export `folder`; returns their paths."""
    folder = Path(folder)
    config = read_config(folder)
    if config.kind != "decoder":
        raise ExportError(f"{folder}: kind {config.kind!r}; onnxruntime-genai's layout is written for decoder-only models")
    model = onnx.load(str(folder / config.files["model"]), load_external_data=False)
    inputs = {value.name for value in model.graph.input}
    cache = [f"past_key_values.{i}.{part}" for i in range(config.num_layers) for part in ("key", "value")]
    if not {_EMBEDS, "attention_mask"} <= inputs or config.past_names != cache:
        raise ExportError(
            f"{folder}: {config.files['model']} takes {sorted(inputs)[:6]}...; onnxruntime-genai's layout needs "
            f"{_EMBEDS}, attention_mask and past_key_values.<layer>.key/value for {config.num_layers} layers"
        )
    table, ids_to_rows = _table(folder, config)
    graph = model.graph
    kept = [value for value in graph.input if value.name not in (_EMBEDS, "logits_to_keep")]
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            *kept,
            helper.make_tensor_value_info(PROMPTS, TensorProto.FLOAT, ["prompt_rows", config.hidden_size]),
        ]
    )
    constants = list(table)
    if "logits_to_keep" in inputs:
        constants.append(numpy_helper.from_array(np.array([1], np.int64), "logits_to_keep"))
        _last_position_only(graph)
    graph.initializer.extend(constants)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*ids_to_rows, *nodes])
    written = [folder / GENAI_GRAPH, folder / GENAI_CONFIG]
    write_atomic(written[0], lambda handle: handle.write(model.SerializeToString()))
    text = json.dumps(genai_config(config, "position_ids" in inputs), indent=2) + "\n"
    write_atomic(written[1], lambda handle: handle.write(text), mode="w")
    return written


def _last_position_only(graph: onnx.GraphProto) -> None:
    """Declare the logits' positions as 1: onnxruntime-genai then binds a [batch, 1, vocab] buffer for the
    prefill too ("trimmed prefill logits"), instead of the logits of every prompt position it would throw away."""
    (logits,) = [value for value in graph.output if value.name == "logits"]
    positions = logits.type.tensor_type.shape.dim[1]
    positions.Clear()
    positions.dim_value = 1


def genai_config(config: ExportConfig, positions: bool) -> dict:
    """onnxruntime-genai's description of the graph: names, shapes of the cache, tokens; greedy by default."""
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if positions:
        names["position_ids"] = "position_ids"
    names |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    eos = config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else config.eos_token_ids
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_ids[0]
    context = config.max_positions or 2048
    return {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else pad,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "softprompt-onnx", "provider_options": []},
                "filename": GENAI_GRAPH,
                "head_size": config.head_size,
                "hidden_size": config.hidden_size,
                "inputs": names,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_heads,
                "num_hidden_layers": config.num_layers,
                "num_key_value_heads": config.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": "llama",  # the graph's inputs and outputs are named above: no architecture-specific handling
            "vocab_size": config.vocab_size,
        },
        "search": {
            "do_sample": False,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # One buffer for past and present (GroupQueryAttention writes in place) where the graph shares its cache.
            "past_present_share_buffer": config.kv_cache == "shared",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _table(folder: Path, config: ExportConfig) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The table's initializers (pointing into the file that holds it) and the nodes from `input_ids` to
    `inputs_embeds`, computing what ScaledRows computes, in its order, in float32."""
    vocab, width = config.vocab_size, config.hidden_size
    path = folder / config.files["embeddings"]
    placed = config.table_in_graph
    scales: onnx.TensorProto | None
    if placed is not None:
        scale_type = np.dtype(str(placed.get("scales_dtype", "float32")))
        codes = external_reference("table.codes", np.uint8, (vocab, width), path.name, placed["codes_offset"])
        scales = external_reference("table.scales", scale_type, (vocab, width // BLOCK), path.name, placed["scales_offset"])
        zero_point, factor = int(placed["zero_point"]), float(placed.get("factor", 1.0))
    else:
        codes = _npy("table.codes", path, (vocab, width))
        scales_file = config.files.get("embedding_scales")
        scales = _npy("table.scales", folder / scales_file, None) if scales_file else None
        zero_point, factor = 0, 1.0
    n = helper.make_node
    vocab_id, zero = "table.vocab", "table.zero"
    constants = [
        numpy_helper.from_array(np.array(vocab, np.int64), vocab_id),
        numpy_helper.from_array(np.array(0, np.int64), zero),
        numpy_helper.from_array(np.array([-1], np.int64), "table.last_axis"),
    ]
    nodes = [
        n("GreaterOrEqual", ["input_ids", vocab_id], ["table.is_prompt"], name="table.is_prompt"),
        n("Where", ["table.is_prompt", zero, "input_ids"], ["table.ids"], name="table.ids"),
        n("Sub", ["input_ids", vocab_id], ["table.prompt_ids_all"], name="table.prompt_ids_all"),
        n("Where", ["table.is_prompt", "table.prompt_ids_all", zero], ["table.prompt_ids"], name="table.prompt_ids"),
        n("Gather", [codes.name, "table.ids"], ["table.codes_rows"], name="table.codes_rows"),
    ]
    rows = "table.codes_rows"
    if codes.data_type != TensorProto.FLOAT:
        nodes.append(n("Cast", [rows], ["table.rows_float"], name="table.rows_float", to=TensorProto.FLOAT))
        rows = "table.rows_float"
    if zero_point:
        constants.append(numpy_helper.from_array(np.array(zero_point, np.float32), "table.zero_point"))
        nodes.append(n("Sub", [rows, "table.zero_point"], ["table.centred"], name="table.centred"))
        rows = "table.centred"
    if scales is not None:
        blocks = int(scales.dims[1])
        constants.append(numpy_helper.from_array(np.array([0, 0, blocks, width // blocks], np.int64), "table.blocked"))
        constants.append(numpy_helper.from_array(np.array([0, 0, width], np.int64), "table.width"))
        nodes += [
            n("Gather", [scales.name, "table.ids"], ["table.scale_rows"], name="table.scale_rows"),
            n("Reshape", [rows, "table.blocked"], ["table.blocks"], name="table.blocks"),
        ]
        scale_rows = "table.scale_rows"
        if scales.data_type != TensorProto.FLOAT:
            nodes.append(n("Cast", [scale_rows], ["table.scales_float"], name="table.scales_float", to=TensorProto.FLOAT))
            scale_rows = "table.scales_float"
        nodes += [
            n("Unsqueeze", [scale_rows, "table.last_axis"], ["table.scale_blocks"], name="table.scale_blocks"),
            n("Mul", ["table.blocks", "table.scale_blocks"], ["table.scaled"], name="table.scaled"),
        ]
        rows = "table.scaled"
        if factor != 1:
            constants.append(numpy_helper.from_array(np.array(factor, np.float32), "table.factor"))
            nodes.append(n("Mul", [rows, "table.factor"], ["table.scaled_by_factor"], name="table.scaled_by_factor"))
            rows = "table.scaled_by_factor"
        nodes.append(n("Reshape", [rows, "table.width"], ["table.rows"], name="table.rows"))
        rows = "table.rows"
    nodes += [
        n("Gather", [PROMPTS, "table.prompt_ids"], ["table.prompt_rows"], name="table.prompt_rows"),
        n("Unsqueeze", ["table.is_prompt", "table.last_axis"], ["table.is_prompt_row"], name="table.is_prompt_row"),
        n("Where", ["table.is_prompt_row", "table.prompt_rows", rows], [_EMBEDS], name="table.inputs_embeds"),
    ]
    return [codes, *([scales] if scales is not None else []), *constants], nodes


def _npy(name: str, path: Path, shape: tuple[int, int] | None) -> onnx.TensorProto:
    """An initializer over a .npy file's array, after its header."""
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    if (shape is not None and mapped.shape != shape) or not mapped.flags.c_contiguous:
        raise ExportError(f"{path}: {mapped.dtype} {mapped.shape}; expected a C-order table of {shape}")
    offset, dtype, found = mapped.offset, mapped.dtype, mapped.shape
    del mapped
    return external_reference(name, dtype, found, path.name, offset)
