"""--precision gguf: a GGUF model's own blocks kept (exporter/gguf_weights.py), on tiny GGUF files written here.

Every quantization type the exporter stores is decoded and compared with gguf-py's own dequantization (what
transformers loads, and what llama.cpp computes), bit for bit; then a two-layer Llama whose tensors use all of
them at once (mixed inside packed products, as Q4_K_M files mix them) is exported and checked against PyTorch
on the file's dequantized weights at float compute.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import onnx
import pytest

from softprompt.exporter.cli import main as export_main
from softprompt.exporter.gguf_weights import DECODERS, decode
from softprompt.formats.export_folder import read_config
from softprompt.runtime import load

from conftest import genai_layout_matches

T = gguf.GGMLQuantizationType
# (bits MatMulNBits stores, values per scale, float minimums) for each type: what the table in gguf_weights says
FORMS = {
    "Q4_0": (4, 32, False),
    "Q4_1": (4, 32, True),
    "Q5_0": (8, 32, False),
    "Q5_1": (8, 32, True),
    "Q8_0": (8, 32, False),
    "Q2_K": (4, 16, True),
    "Q3_K": (4, 16, False),
    "Q4_K": (4, 32, True),
    "Q5_K": (8, 32, True),
    "Q6_K": (8, 16, False),
}
# Where each K-quant block keeps its float16 super-block scales (d, then dmin where there is one), and their size.
K_SCALES = {"Q2_K": (80, 2e-3), "Q3_K": (108, 1e-3), "Q4_K": (0, 4e-4), "Q5_K": (0, 2e-4), "Q6_K": (208, 3e-5)}


def quantized(kind: str, rows: int, width: int, rng) -> np.ndarray:
    """A [rows, width] tensor's bytes in GGUF type `kind`: quantized from normal weights where gguf-py can, else
    random blocks with small float16 super-block scales (every bit pattern of a K-quant block is a valid one)."""
    qtype = T[kind]
    if kind in K_SCALES:
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (rows * width // block_values, block_bytes), dtype=np.uint8)
        at, size = K_SCALES[kind]
        for offset in (at, at + 2) if kind in ("Q2_K", "Q4_K", "Q5_K") else (at,):
            scales = rng.uniform(0.5, 1.5, len(blocks)) * size
            blocks[:, offset : offset + 2] = scales.astype(np.float16).view(np.uint8).reshape(-1, 2)
        return blocks.reshape(rows, -1)
    return gguf.quants.quantize(rng.normal(0, 0.05, (rows, width)).astype(np.float32), qtype)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_each_type_decodes_to_gguf_py_s_values_bit_for_bit(kind, monkeypatch):
    from softprompt.exporter import gguf_weights

    monkeypatch.setattr(gguf_weights, "VALUES_AT_ONCE", 1024)  # decoded in slices of two rows, as a big tensor is
    data = quantized(kind, 6, 512, np.random.default_rng(0))
    blocks = decode(data, kind)
    assert (blocks.bits, blocks.block, blocks.mins is not None) == FORMS[kind]
    assert blocks.codes.shape == (6, 512) and int(blocks.codes.max()) < 1 << blocks.bits
    expected = gguf.quants.dequantize(data, T[kind])
    assert np.array_equal(blocks.dequantize().T, expected)


def test_an_unknown_type_is_named():
    with pytest.raises(Exception, match="IQ4_XS has no blocked form here; expected one of Q4_0"):
        decode(np.zeros((1, 136), np.uint8), "IQ4_XS")


# ---- a two-layer Llama in every type --------------------------------------------------------------------------

WIDTH, FFN, HEADS, KV_HEADS = 256, 512, 4, 2
HEAD = WIDTH // HEADS
LAYERS = [  # attention q, k, v, output; MLP gate, up, down
    {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0", "attn_output": "Q5_1", "ffn_gate": "Q8_0", "ffn_up": "Q6_K", "ffn_down": "Q5_K"},
    {"attn_q": "Q2_K", "attn_k": "Q3_K", "attn_v": "Q4_K", "attn_output": "F16", "ffn_gate": "Q4_K", "ffn_up": "Q4_1", "ffn_down": "Q3_K"},
]  # fmt: skip
# The built graph packs q/k/v and gate/up: each packed product takes the most bits, the smallest block, and float
# minimums if any part has them. F16 has no blocks: that product stays float32.
EXPECTED = {"matmuls_q8+min": 3, "matmuls_q8": 2, "matmuls_q4+min": 2, "matmuls_q4": 1, "matmuls_fp32": 1}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_llama_gguf(path, table_type: str = "Q5_0", output_type: str = "Q6_K") -> None:
    rng = np.random.default_rng(7)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), "▁", *LETTERS, *(f"▁{c}" for c in LETTERS)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(len(LAYERS))
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def tensor(name, kind, rows, width):
        if kind == "F16":
            writer.add_tensor(name, rng.normal(0, 0.05, (rows, width)).astype(np.float16))
        else:
            writer.add_tensor(name, quantized(kind, rows, width, rng), raw_dtype=T[kind])

    tensor("token_embd.weight", table_type, len(tokens), WIDTH)
    shapes = {
        "attn_q": (WIDTH, WIDTH),
        "attn_k": (KV_HEADS * HEAD, WIDTH),
        "attn_v": (KV_HEADS * HEAD, WIDTH),
        "attn_output": (WIDTH, WIDTH),
        "ffn_gate": (FFN, WIDTH),
        "ffn_up": (FFN, WIDTH),
        "ffn_down": (WIDTH, FFN),
    }
    for i, layer in enumerate(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", rng.uniform(0.8, 1.2, WIDTH).astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", rng.uniform(0.8, 1.2, WIDTH).astype(np.float32))
        for part, kind in layer.items():
            tensor(f"blk.{i}.{part}.weight", kind, *shapes[part])
    writer.add_tensor("output_norm.weight", rng.uniform(0.8, 1.2, WIDTH).astype(np.float32))
    tensor("output.weight", output_type, len(tokens), WIDTH)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_exports(tmp_path_factory):
    """The tiny Llama GGUF exported at fp32 and at --precision gguf with float compute (its weights' error alone)."""
    root = tmp_path_factory.mktemp("gguf")
    write_llama_gguf(root / "tiny.gguf")
    cache = ["--cache-dir", str(root / "cache"), "-q"]
    assert export_main([str(root / "tiny.gguf"), str(root / "fp32"), *cache]) == 0
    # the built graph against PyTorch on the file's dequantized weights, held to fp32's own tolerance
    gguf_args = ["--precision", "gguf", "--accuracy-level", "0", "--tolerance", "1e-4", *cache]
    assert export_main([str(root / "tiny.gguf"), str(root / "gguf"), *gguf_args]) == 0
    return root


def test_every_block_is_kept_and_the_graph_computes_the_files_weights(gguf_exports):
    config = read_config(gguf_exports / "gguf")
    assert config.precision == "gguf" and config.quantization == {"precision": "gguf", "accuracy_level": 0}
    changes = config.validation["changes"]["model"]
    assert {k: v for k, v in changes.items() if k.startswith("matmuls_")} == EXPECTED
    assert max(config.validation["max_relative_diff"].values()) < 1e-4  # float precision against PyTorch
    graph = onnx.load(str(gguf_exports / "gguf" / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == sum(EXPECTED.values()) - EXPECTED["matmuls_fp32"]
    assert changes["bytes"] < changes["bytes_fp32"] / 2.5


def test_the_table_is_the_files_own_int8_blocks(gguf_exports):
    """token_embd is Q5_0: d (q - 16) per block of 32 is exactly int8 codes q - 16 with the scale d."""
    reader = gguf.GGUFReader(str(gguf_exports / "tiny.gguf"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(np.asarray(embd.data), embd.tensor_type)
    stored = json.loads((gguf_exports / "gguf" / "softprompt.json").read_text())["files"]
    assert np.load(gguf_exports / "gguf" / stored["embeddings"]).dtype == np.int8
    model = load(gguf_exports / "gguf")
    assert np.array_equal(model.table[np.arange(len(expected))], expected)


def test_the_gguf_export_generates_as_the_fp32_one(gguf_exports):
    fp32, kept = load(gguf_exports / "fp32"), load(gguf_exports / "gguf")
    for text in ("a b c", "the quick fox"):
        assert kept.complete(text, max_new_tokens=8)[0].token_ids == fp32.complete(text, max_new_tokens=8)[0].token_ids


def test_gguf_precision_needs_a_gguf_file_and_takes_no_recipe(llama_dir, tmp_path, capsys):
    assert export_main([str(llama_dir), str(tmp_path / "x"), "--precision", "gguf", "-q"]) == 1
    err = capsys.readouterr().err
    assert "is not a .gguf file" in err and "use --precision int8 or int4" in err
    assert not (tmp_path / "x").exists()
    for flag in (["--algorithm", "rtn"], ["--keep", "lm_head"], ["--block-size", "64"]):
        with pytest.raises(SystemExit) as exc:
            export_main([str(llama_dir), str(tmp_path / "y"), "--precision", "gguf", *flag])
        assert exc.value.code == 2 and "add --precision int8 or int4" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q6_K"])
def test_a_table_scaled_by_the_model_is_the_files_blocks_with_scaled_scales(kind, tmp_path):
    """Gemma's table is token_embd x sqrt(width), which llama.cpp applies after the lookup: stored as the file's
    int8 codes with each scale times that factor, the rows come back to float32 rounding; unscaled, exactly."""
    from softprompt.exporter.gguf_weights import gguf_table, index_rows
    from softprompt.formats.embedding_table import ScaledRows

    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "gemma3")
    writer.add_tensor("token_embd.weight", quantized(kind, 40, 256, np.random.default_rng(3)), raw_dtype=T[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    rows = index_rows(tmp_path / "t.gguf")
    embd = gguf.quants.dequantize(np.asarray(rows.data("token_embd.weight")), T[kind])
    dtype, codes, scales = gguf_table(embd, rows)
    assert dtype == "int8" and np.array_equal(ScaledRows(codes, scales)[:], embd)
    scaled = embd * np.float32(256**0.5 * 1.1)  # as PyTorch scales the looked-up rows (not by a power of two)
    dtype, codes, scales = gguf_table(scaled, rows)
    assert dtype == "int8" and codes.dtype == np.int8
    assert np.abs(ScaledRows(codes, scales)[:] - scaled).max() <= 1e-6 * np.abs(scaled).max()
    assert gguf_table(scaled + np.float32(1e-3), rows)[0] == "fp32"  # not the file's rows: kept as it is


def write_gemma_gguf(path, width: int = 160) -> None:
    """A two-layer Gemma-3 whose Q8_0 token_embd is also its lm_head, as the real Gemma-3-270m's: the model scales
    the rows it looks up by sqrt(width), 12.649 for 160 (not a power of two, so not exactly an int8 table's scale)."""
    rng = np.random.default_rng(11)
    heads, kv_heads, head, ffn = 2, 1, 64, 512
    tokens = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        *(f"<0x{i:02X}>" for i in range(256)),
        "▁",
        *LETTERS,
        *(f"▁{c}" for c in LETTERS),
    ]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (len(tokens) - 260)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(128)
    writer.add_embedding_length(width)
    writer.add_block_count(2)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head)
    writer.add_value_length(head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 260 + [-float(i) for i in range(len(tokens) - 260)])
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)

    def tensor(name, kind, rows, columns):
        writer.add_tensor(name, quantized(kind, rows, columns, rng), raw_dtype=T[kind])

    def norm(name, size):
        writer.add_tensor(name, rng.uniform(0.8, 1.2, size).astype(np.float32))

    tensor("token_embd.weight", "Q8_0", len(tokens), width)
    for i in range(2):
        for part in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(f"blk.{i}.{part}.weight", width)
        norm(f"blk.{i}.attn_q_norm.weight", head)
        norm(f"blk.{i}.attn_k_norm.weight", head)
        tensor(f"blk.{i}.attn_q.weight", "Q5_0", heads * head, width)
        tensor(f"blk.{i}.attn_k.weight", "Q8_0", kv_heads * head, width)
        tensor(f"blk.{i}.attn_v.weight", "Q8_0", kv_heads * head, width)
        tensor(f"blk.{i}.attn_output.weight", "Q4_0", width, heads * head)
        tensor(f"blk.{i}.ffn_gate.weight", "Q5_0", ffn, width)
        tensor(f"blk.{i}.ffn_up.weight", "Q5_0", ffn, width)
        tensor(f"blk.{i}.ffn_down.weight", "Q6_K", width, ffn)
    norm("output_norm.weight", width)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_tied_head_the_table_is_a_multiple_of_holds_the_table_exactly(tmp_path):
    """Gemma's lm_head is its Q8_0 token_embd and its table those rows times sqrt(width): the gguf export keeps the
    head's own blocks (the logits need no division), stores the table only there with the factor, and the rows read
    back are the model's table bit for bit, as the fp32 export's are; both generate the same tokens."""
    write_gemma_gguf(tmp_path / "gemma.gguf")
    cache = ["--cache-dir", str(tmp_path / "cache"), "-q"]
    assert export_main([str(tmp_path / "gemma.gguf"), str(tmp_path / "fp32"), *cache]) == 0
    args = ["--precision", "gguf", "--accuracy-level", "0", "--tolerance", "1e-4", *cache]
    assert export_main([str(tmp_path / "gemma.gguf"), str(tmp_path / "gguf"), *args]) == 0

    config = read_config(tmp_path / "gguf")
    factor = np.float32(160**0.5)
    assert config.files["embeddings"] == "model.onnx.data" and config.table_in_graph["factor"] == float(factor)
    assert not (tmp_path / "gguf" / "embeddings.npy").exists()
    graph = onnx.load(str(tmp_path / "gguf" / "model.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "Div" for n in graph.node)  # the head's logits are the file's own product
    reader = gguf.GGUFReader(str(tmp_path / "gemma.gguf"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = gguf.quants.dequantize(np.asarray(embd.data), embd.tensor_type) * factor  # as PyTorch scales its lookups
    fp32, kept = load(tmp_path / "fp32"), load(tmp_path / "gguf")
    ids = np.arange(len(want))
    assert np.array_equal(fp32.table[ids], want) and np.array_equal(kept.table[ids], want)
    for text in ("a b c", "the quick fox"):
        assert kept.complete(text, max_new_tokens=8)[0].token_ids == fp32.complete(text, max_new_tokens=8)[0].token_ids
    assert genai_layout_matches(tmp_path / "gguf")  # genai's layout multiplies the rows by the factor, as the runtime
