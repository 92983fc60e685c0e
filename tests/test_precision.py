"""Exports at fp16, int8 and int4: validated against PyTorch fp32, recorded, served with fp32 prompts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

from softprompt.exporter import ExportError, ExportValidationError, export_model
from softprompt.exporter.cli import main as export_main
from softprompt.exporter.dynamic_int8 import BUDGET
from softprompt.exporter.precision import FAST_INT4, Precision, default_precision, for_kind
from softprompt.formats.export_folder import read_config
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.prompt_bank.cli import main as bank_main
from softprompt.runtime import load

from conftest import TEXTS, TINY_INT4_TOLERANCE, random_prompt


def weight_products(path) -> int:
    """Matrix products by a constant weight: what int8 and int4 quantize."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return sum(1 for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights)


def ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def nbits(path) -> Counter:
    graph = onnx.load(str(path), load_external_data=False).graph
    return Counter(next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits")


@pytest.fixture(scope="module")
def quantized(llama_dir, tmp_path_factory):
    """int8 and int4 exports of the tiny Llama (the built graph), made through the CLI."""
    root = tmp_path_factory.mktemp("precision")
    assert export_main([str(llama_dir), str(root / "int8"), "--precision", "int8", "-q"]) == 0
    assert (
        export_main([str(llama_dir), str(root / "int4"), "--precision", "int4", "--tolerance", str(TINY_INT4_TOLERANCE), "-q"])
        == 0
    )
    return root / "int8", root / "int4"


def graph_bytes(folder) -> int:
    """The graph and its weights' data file."""
    return sum(path.stat().st_size for path in (folder / "model.onnx", folder / "model.onnx.data") if path.exists())


def test_int8_and_int4_record_their_settings_and_quantize_every_product(llama_export, quantized):
    int8, int4 = quantized
    fp32 = read_config(llama_export)
    products = weight_products(llama_export / "model.onnx")
    for folder, bits in ((int8, 8), (int4, 4)):
        config = read_config(folder)
        assert config.precision == f"int{bits}" and config.quantization["accuracy_level"] == 4
        assert config.quantization["block_size"] == 32
        assert config.quantization["algorithm"] == ("rtn" if bits == 8 else "offset")
        counts = nbits(folder / "model.onnx")
        assert sum(counts.values()) == products  # every weight matrix, lm_head included
        assert config.validation["fp32"] and config.validation["greedy_agreement"]
        assert config.fingerprint == fp32.fingerprint  # the model, not its precision
        assert graph_bytes(folder) < graph_bytes(llama_export) / (2.5 if bits == 8 else 3)
    # The table the runtime gathers from is stored as int8 rows with a scale each, for both.
    for folder in quantized:
        assert np.load(folder / "embeddings.npy").dtype == np.int8
        assert read_config(folder).files["embedding_scales"] == "embedding_scales.npy"
    # int4 keeps the projection to the logits at 8 bits by default, and says so.
    assert nbits(int4 / "model.onnx") == Counter({4: products - 1, 8: 1})
    assert read_config(int4).quantization["keep"] == ["lm_head=int8"]


def test_a_prompt_for_the_fp32_export_serves_on_int8_and_int4(llama_export, quantized, tmp_path):
    config = read_config(llama_export)
    save_prompt(tmp_path, "t", random_prompt(4, config.hidden_size), fingerprint=config.fingerprint)
    reference = load(llama_export, bank=tmp_path)
    want = reference.logits(TEXTS[0], task="t")
    for folder in quantized:
        assert bank_main(["verify", str(tmp_path), "--model", str(folder)]) == 0
        model = load(folder, bank=tmp_path)
        np.testing.assert_array_equal(model.prompt("t"), reference.prompt("t"))  # a prompt is never quantized
        got = model.logits(TEXTS[0], task="t")
        assert got.shape == want.shape
        assert np.abs(got - want).max() < TINY_INT4_TOLERANCE * np.abs(want).max()
        batch = [c.token_ids for c in model.complete(TEXTS, task="t", max_new_tokens=6)]
        assert batch == [model.complete(text, task="t", max_new_tokens=6)[0].token_ids for text in TEXTS]


def test_verify_names_the_precision_it_checked_against(quantized, tmp_path, capsys):
    int8 = quantized[0]
    config = read_config(int8)
    save_prompt(tmp_path, "t", random_prompt(4, config.hidden_size), fingerprint=config.fingerprint)
    assert bank_main(["verify", str(tmp_path), "--model", str(int8)]) == 0
    assert "int8 graphs" in capsys.readouterr().out.splitlines()[-1]


def test_fp16_keeps_greedy_tokens_and_warns_on_the_cpu(llama_dir, llama_export, tmp_path):
    config = export_model(str(llama_dir), tmp_path / "fp16", precision="fp16", log=lambda m: None)
    assert config.precision == "fp16" and config.quantization == {}
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx")).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in graph.input)  # fed like fp32
    assert np.load(tmp_path / "fp16" / "embeddings.npy").dtype == np.float16
    with pytest.warns(RuntimeWarning, match="fp16, which is for CUDA"):
        model = load(tmp_path / "fp16", providers="cpu")
    fp32 = load(llama_export)
    for text in TEXTS:
        assert model.complete(text, max_new_tokens=8)[0].token_ids == fp32.complete(text, max_new_tokens=8)[0].token_ids


def test_traced_gpt2_and_keep_rules(gpt2_dir, tmp_path):
    """A traced graph (other weight names, a biased lm_head) quantizes; --keep holds named weights at fp32."""
    precision = Precision("int8", accuracy_level=4, keep=("lm_head",))
    config = export_model(str(gpt2_dir), tmp_path / "int8", precision=precision, log=lambda m: None)
    assert config.validation["graph"] == "traced"
    assert config.validation["changes"]["model"]["matmuls_fp32"] == 1
    model = load(tmp_path / "int8")
    assert len(model.complete(TEXTS[1], max_new_tokens=4)[0].token_ids) == 4
    with pytest.raises(ExportError, match=r"--keep no_such_weight: matches no weight of the graph; its weights are named like"):
        export_model(str(gpt2_dir), tmp_path / "bad", precision=Precision("int8", keep=("no_such_weight",)), log=lambda m: None)
    assert not (tmp_path / "bad").exists()


def first_product(path) -> list[str]:
    """The name of a graph's first matrix product, as --keep and kept_fp32 name them."""
    from softprompt.exporter.dynamic_int8 import products
    from softprompt.exporter.graph_rewrites import gemm_as_matmul

    model = onnx.load(str(path))
    gemm_as_matmul(model)
    return products(model)[:1]


def test_encoder_and_seq2seq_exports_take_int8_and_fp16(tmp_path):
    from test_encoder import make_bert

    from conftest import make_seq2seq

    bert = make_bert(tmp_path / "bert")
    export_model(str(bert), tmp_path / "bert-fp32", log=lambda m: None)
    config = export_model(str(bert), tmp_path / "bert-int8", precision="int8", log=lambda m: None)
    assert config.kind == "encoder" and config.precision == "int8"
    # An encoder's int8 quantizes activations too, keeping at fp32 the products sample text shows matter most.
    assert config.quantization == {"precision": "int8", "algorithm": "dynamic", "keep": []}
    changes = config.validation["changes"]["model"]
    assert ops(tmp_path / "bert-int8" / "model.onnx")["MatMulInteger"] == changes["matmuls_int8_dynamic"] > 0
    assert changes["calibration_error"] <= BUDGET and len(changes["kept_fp32"]) == changes["matmuls_fp32"]
    fp32 = load(tmp_path / "bert-fp32").embed(TEXTS)
    int8 = load(tmp_path / "bert-int8").embed(TEXTS)
    assert (np.sum(fp32 * int8, axis=1) > 0.99).all()  # unit vectors: cosine similarity to the fp32 embeddings
    # Weight-only int8 is still there for the asking, at float compute; --keep settles what stays fp32 unmeasured.
    config = export_model(str(bert), tmp_path / "bert-nbits", precision=Precision("int8", algorithm="rtn"), log=lambda m: None)
    assert config.quantization["accuracy_level"] == 0 and nbits(tmp_path / "bert-nbits" / "model.onnx")[8] > 0
    # The products calibration kept (none where this CPU's int8 products are accurate enough: VNNI's are), else one.
    kept = changes["kept_fp32"] or first_product(tmp_path / "bert-fp32" / "model.onnx")
    config = export_model(
        str(bert), tmp_path / "bert-kept", precision=Precision("int8", algorithm="dynamic", keep=tuple(kept)), log=lambda m: None
    )
    assert config.validation["changes"]["model"]["kept_fp32"] == kept
    assert "calibration_error" not in config.validation["changes"]["model"]
    export_model(str(bert), tmp_path / "bert-fp16", precision="fp16", log=lambda m: None)
    with pytest.warns(RuntimeWarning, match="fp16"):
        fp16 = load(tmp_path / "bert-fp16").embed(TEXTS)
    assert (np.sum(fp32 * fp16, axis=1) > 0.999).all()

    # (BART: the tiny random T5, initialised at 3x scale, moves by a third of its range even at int8.)
    bart = make_seq2seq(tmp_path / "bart", "bart")
    config = export_model(str(bart), tmp_path / "bart-int8", precision="int8", log=lambda m: None)
    assert config.kind == "seq2seq" and config.validation["changes"].keys() == {"encoder", "decoder"}
    assert nbits(tmp_path / "bart-int8" / "decoder.onnx")[8] > 0 and nbits(tmp_path / "bart-int8" / "encoder.onnx")[8] > 0
    assert isinstance(load(tmp_path / "bart-int8").generate(TEXTS[1], max_new_tokens=4), str)


def test_a_quantized_export_out_of_bounds_is_refused_and_the_old_one_kept(llama_dir, llama_export, tmp_path, capsys):
    out = tmp_path / "export"
    export_model(str(llama_dir), out, log=lambda m: None)
    before = json.loads((out / "softprompt.json").read_text())
    # The message names the tolerance as given (2.5e-3, not rounded to "2e-03").
    with pytest.raises(
        ExportValidationError, match=r"--precision int4: .*logits max \|diff\| / max \|ref\| = \S+ > 0\.0025.*--keep"
    ):
        export_model(str(llama_dir), out, precision="int4", tolerance=2.5e-3, overwrite=True, log=lambda m: None)
    assert json.loads((out / "softprompt.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left behind
    args = [str(llama_dir), str(out), "--force", "--precision", "int4", "--tolerance", "2.5e-3", "-q"]
    assert export_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --precision int4:")


def test_quantizing_leaves_the_callers_logging_alone(llama_export, tmp_path):
    """onnxruntime's weight quantizer sets the root logger to INFO when imported; an export from a program must not."""
    shutil.copytree(llama_export, tmp_path / "export")
    code = (
        "import logging\n"
        "from pathlib import Path\n"
        "from softprompt.exporter.precision import Precision, apply_precision\n"
        f"apply_precision(Path({str(tmp_path / 'export' / 'model.onnx')!r}), Precision('int8', algorithm='rtn'))\n"
        "logging.getLogger('some.library').info('an INFO message of another library')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert nbits(tmp_path / "export" / "model.onnx")[8] > 0  # the quantizer ran
    assert "an INFO message" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "int3"], "invalid choice: 'int3'"),
        (["--block-size", "64"], "--block-size set(s) how int8/int4 weights are quantized; add --precision int8 or int4"),
        (["--precision", "fp16", "--keep", "lm_head"], "--keep set(s) how int8/int4 weights"),
    ],
)
def test_precision_options_are_checked_before_anything_runs(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["some-model", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "int8", "block_size": 24}, "block size 24; expected a power of two, at least 16"),
        ({"name": "int8", "algorithm": "hqq"}, "hqq quantizes to 4 bits only"),
        ({"name": "int8", "algorithm": "offset"}, "offset quantizes to 4 bits only"),
        ({"name": "int4", "algorithm": "dynamic"}, "dynamic quantizes to 8 bits only"),
        ({"name": "int8", "algorithm": "dynamic", "accuracy_level": 4}, "computes in int8 without it"),
        ({"name": "int8", "keep": ("lm_head=int8",)}, "NAME=int8 in an int4 export"),
        ({"name": "int2"}, "precision 'int2'; expected one of fp32, fp16, int8, int4"),
    ],
)
def test_bad_precision_settings_name_what_is_possible(settings, message):
    with pytest.raises(ExportError, match=message):
        Precision(**settings)


def test_defaults_are_measured_choices_and_options_override_them():
    assert default_precision("int4") == Precision("int4", algorithm="offset", keep=("lm_head=int8",))
    assert for_kind(default_precision("int8"), "decoder").accuracy_level == 4
    encoder = for_kind(default_precision("int8"), "encoder")
    assert (encoder.algorithm, encoder.accuracy_level) == ("dynamic", None)  # int8 activations: no MatMulNBits
    assert for_kind(default_precision("int8", algorithm="rtn"), "encoder").accuracy_level == 0
    assert for_kind(default_precision("int8"), "decoder").algorithm == "rtn"
    assert for_kind(Precision("int8", accuracy_level=2), "encoder").accuracy_level == 2  # a choice is kept
    assert default_precision("int8", accuracy_level=0, block_size=None).accuracy_level == 0
    assert default_precision("fp32") == Precision("fp32")


def test_prompts_saved_on_one_precision_load_on_another(quantized, tmp_path):
    int8, int4 = quantized
    config = read_config(int4)
    save_prompt(tmp_path, "t", random_prompt(3, config.hidden_size), fingerprint=read_config(int8).fingerprint)
    assert load_prompt(tmp_path, "t", fingerprint=config.fingerprint).vectors.shape == (3, config.hidden_size)


def snap_to_q4_1(folder, out):
    """A copy of the model whose linear weights lie on a 4-bit grid with a float minimum per block of 32
    inputs, as in a Q4_1 GGUF file (where the default model comes from)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.in_features % 32 == 0:
                w = module.weight.view(module.out_features, -1, 32)
                low = w.amin(-1, keepdim=True)
                step = (w.amax(-1, keepdim=True) - low) / 15
                w.copy_(low + step * torch.round((w - low) / step))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (out / name).write_bytes((folder / name).read_bytes())
    return out


def test_int4_offsets_are_exact_on_weights_from_a_q4_1_file(llama_dir, tmp_path):
    """A float minimum per block (MatMulNBits' integer kernel plus one small product of block sums) holds a
    Q4_1 grid exactly; integer zero points (rtn) move every block by up to half a step."""
    grid = snap_to_q4_1(llama_dir, tmp_path / "q4_1")
    export_model(str(grid), tmp_path / "fp32", log=lambda m: None)
    errors = {}
    for algorithm in ("offset", "rtn"):
        precision = Precision("int4", algorithm=algorithm, accuracy_level=0)  # float compute: the weights' error alone
        config = export_model(
            str(grid), tmp_path / algorithm, precision=precision, tolerance=TINY_INT4_TOLERANCE, log=lambda m: None
        )
        errors[algorithm] = max(config.validation["max_relative_diff"].values())  # the graph against PyTorch fp32
        changes = config.validation["changes"]["model"]
        assert changes["matmuls_int4"] == weight_products(tmp_path / "fp32" / "model.onnx")
        assert changes.get("int4_with_float_offsets", 0) == (changes["matmuls_int4"] if algorithm == "offset" else 0)
    assert errors["offset"] < 1e-3 < 0.05 < errors["rtn"], errors


def test_quantized_weights_sit_beside_the_graph_readable_as_the_graph_is(quantized):
    for folder in quantized:
        graph, data = folder / "model.onnx", folder / "model.onnx.data"
        stored = onnx.load(str(graph), load_external_data=False).graph
        packed = {n.input[1] for n in stored.node if n.op_type == "MatMulNBits"}
        external = {t.name for t in stored.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert data.is_file() and packed <= external
        assert data.stat().st_mode & 0o777 == graph.stat().st_mode & 0o777


@pytest.mark.parametrize(
    ("place", "message"),
    [
        ({"codes_offset": 10**9, "scales_offset": 0, "zero_point": 128}, "do not fit apart in its"),
        ({"codes_offset": 0, "scales_offset": 0, "zero_point": 128}, "do not fit apart in its"),
        ({"codes_offset": -1, "scales_offset": 0, "zero_point": 128}, "table_in_graph is"),
        ({"codes_offset": 0, "scales_offset": 0}, "table_in_graph is"),
        ({"codes_offset": 0, "scales_offset": 0, "zero_point": 128, "scales_dtype": "float64"}, "table_in_graph is"),
        ([0, 0, 128], "table_in_graph is"),
        *(
            ({"codes_offset": 0, "scales_offset": 0, "zero_point": 128, "factor": bad}, "table_in_graph is")
            for bad in (0, -2.5, float("nan"), True, "16")
        ),
    ],
)
def test_a_table_in_graph_that_does_not_fit_its_file_is_refused(quantized, tmp_path, place, message):
    import shutil

    from softprompt.formats.errors import ExportFormatError

    out = shutil.copytree(quantized[0], tmp_path / "export")
    config = json.loads((out / "softprompt.json").read_text())
    config["files"]["embeddings"] = "model.onnx.data"
    config["table_in_graph"] = place
    (out / "softprompt.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match=message):
        load(out)


def test_dynamic_int8_keeps_the_products_that_move_the_output_most(tmp_path):
    """choose_kept: a budget nothing fits keeps everything, a loose one nothing; otherwise the kept products are the
    ones whose quantization alone moves the outputs most, and the graph with the rest quantized fits the budget."""
    from test_encoder import make_bert
    from transformers import AutoTokenizer

    from softprompt.exporter.dynamic_int8 import Calibration, choose_kept, output_error, products, quantize
    from softprompt.exporter.encoder import calibration_feeds
    from softprompt.exporter.graph_rewrites import gemm_as_matmul

    folder = make_bert(tmp_path / "bert")
    export_model(str(folder), tmp_path / "fp32", log=lambda m: None)
    model = onnx.load(str(tmp_path / "fp32" / "model.onnx"))
    gemm_as_matmul(model)
    table = np.load(tmp_path / "fp32" / "embeddings.npy")
    sets = calibration_feeds(AutoTokenizer.from_pretrained(folder), table, read_config(tmp_path / "fp32").max_positions)
    names = products(model)
    kept, error = choose_kept(model, Calibration(sets, budget=10.0, tolerance=10.0))
    assert kept == [] and error > 0
    kept, error = choose_kept(model, Calibration(sets, budget=0.0, tolerance=0.0))
    assert sorted(kept) == sorted(names) and error == 0.0
    _, everything = choose_kept(model, Calibration(sets, budget=10.0, tolerance=10.0))  # every product at int8
    budget = everything / 2  # what int8 costs depends on the CPU (VNNI or not): half of it must keep some, not all
    calibration = Calibration(sets, budget=budget)
    kept, error = choose_kept(model, calibration)
    assert 0 < len(kept) < len(names) and error <= budget
    import onnxruntime as ort

    def outputs(feeds):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})

    references = [outputs(feeds) for feeds, _ in sets]
    alone = {name: output_error(quantize(model, only=[name]), calibration, references)[0] for name in names}
    assert min(alone[name] for name in kept) >= max(alone[name] for name in names if name not in kept)
    assert output_error(quantize(model, keep=kept), calibration, references)[0] == pytest.approx(error)


def test_fast_int4_is_genai_s_recipe_from_the_command_line(llama_dir, tmp_path, capsys):
    """export-model --precision int4 --fast: an integer grid without zero points, the lm_head at 4 bits too."""
    # Judged by its next-token quality (its logits move by 0.4 of their scale on the tiny model, 0.9 on the default).
    assert export_main([str(llama_dir), str(tmp_path / "fast"), "--precision", "int4", "--fast", "-q"]) == 0
    config = read_config(tmp_path / "fast")
    assert config.validation["tolerance"] is None and config.validation["quality"]["kl_mean"] < 1.0
    # An encoder-decoder at this recipe is validated at tolerance 1, from Python as from the command line.
    assert default_precision("int4", **FAST_INT4).tolerance == 1.0 and default_precision("int4").tolerance == 0.25
    assert config.quantization["algorithm"] == "rtn" and config.quantization["symmetric"] is True
    bits = nbits(tmp_path / "fast" / "model.onnx")
    assert config.quantization["keep"] == [] and set(bits) == {4} and bits[4] > 0  # the lm_head too
    assert len(load(tmp_path / "fast").complete(TEXTS[0], max_new_tokens=3)[0].token_ids) == 3
    for argv, message in (
        (["--precision", "int8", "--fast"], "--fast is a recipe for int4"),
        (["--precision", "int4", "--fast", "--keep", "lm_head=int8"], "--fast sets --keep itself"),
    ):
        with pytest.raises(SystemExit):
            export_main([str(llama_dir), str(tmp_path / "no"), *argv])
        assert message in capsys.readouterr().err


def test_every_graph_keeps_its_weights_in_a_data_file_and_a_quantized_one_keeps_no_fp32_weights(llama_dir, tmp_path):
    """Every export's graph has its weights in model.onnx.data (onnxruntime maps it instead of parsing a whole
    protobuf into memory); the int4 graph replaces the fp32 weights there (onnx appends to a data file that exists,
    which kept the dead fp32 weights), and nothing is written owner-only."""
    import os

    export_model(str(llama_dir), tmp_path / "fp32", log=lambda m: None)
    export_model(str(llama_dir), tmp_path / "int4", precision="int4", tolerance=1.0, log=lambda m: None)  # (a random model)
    for name in ("fp32", "int4"):
        graph = onnx.load(str(tmp_path / name / "model.onnx"), load_external_data=False).graph
        inline = [
            t.name
            for t in graph.initializer
            if t.data_location != onnx.TensorProto.EXTERNAL and t.raw_data and len(t.raw_data) > 4096
        ]
        assert not inline, (name, inline[:3])
    fp32, int4 = ((tmp_path / name / "model.onnx.data").stat().st_size for name in ("fp32", "int4"))
    assert int4 < fp32 / 3, f"int4 data {int4} bytes against fp32's {fp32}"
    umask = os.umask(0)
    os.umask(umask)
    for folder in (tmp_path / "fp32", tmp_path / "int4"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
        for path in folder.iterdir():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, f"{path.name}: {oct(path.stat().st_mode & 0o777)}"
    for name in ("fp32", "int4"):
        assert len(load(tmp_path / name).complete(TEXTS[0], max_new_tokens=3)[0].token_ids) == 3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("external", [False, True])
def test_a_weight_quantized_in_slices_of_rows_is_onnxruntime_s_node_byte_for_byte(
    bits, symmetric, accuracy_level, external, tmp_path, monkeypatch
):
    """The sliced quantizer against onnxruntime's own `quantize_matmul` on the same weight: the same node (name,
    inputs, attributes) and the same initializers, K cut into slices of as few blocks as may be, the last one part
    of a block (and, at 4 bits, an odd number of blocks, whose zero points share a byte in pairs)."""
    from onnx import helper, numpy_helper

    from softprompt.exporter import nbits_slices
    from softprompt.exporter.precision import _nbits_quantizer

    nbits_quantizer = _nbits_quantizer()
    rows, cols = 200, 37  # K: six blocks of 32 and a part one
    weight = np.random.default_rng(bits).standard_normal((rows, cols)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")

    def graph():
        tensor = numpy_helper.from_array(weight, "w")
        model = helper.make_model(helper.make_graph([node], "g", [], [], [tensor]))
        if not external:
            return model, None
        onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
        return onnx.load(str(tmp_path / "m.onnx"), load_external_data=False), tmp_path

    config = nbits_quantizer.DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=symmetric, bits=bits, accuracy_level=accuracy_level
    )
    quantizer = nbits_quantizer.DefaultWeightOnlyQuantizer(config)
    theirs = helper.make_model(helper.make_graph([], "g", [], [], [numpy_helper.from_array(weight, "w")]))
    their_nodes = quantizer.quantize(node, [theirs.graph])
    monkeypatch.setattr(nbits_slices, "SLICE_BYTES", 1)  # a slice of one block's rows (two at 4 bits)
    model, base = graph()
    assert nbits_slices.sliceable(model.graph.initializer[0], config)
    our_nodes, tensors = nbits_slices.quantize(node, model.graph.initializer[0], quantizer, base)
    assert [n.SerializeToString() for n in our_nodes] == [n.SerializeToString() for n in their_nodes]
    made = {t.name: numpy_helper.to_array(t) for t in theirs.graph.initializer if t.name != "w"}
    assert sorted(made) == sorted(t.name for t in tensors)
    for tensor in tensors:
        ours = numpy_helper.to_array(tensor)
        assert ours.dtype == made[tensor.name].dtype and ours.shape == made[tensor.name].shape
        assert np.array_equal(ours, made[tensor.name]), tensor.name
