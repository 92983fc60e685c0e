"""Prefix tasks: per-layer keys and values from PEFT prefix tuning, served as the past of every request."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_parity import serves_like_peft

from softprompt.formats.errors import BackboneMismatchError, InvalidPromptError, PromptBankError
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.prompt_bank.cli import main as bank_main
from softprompt.prompt_bank.peft import prefix_keys_values, prefix_table
from softprompt.runtime import RequestError, load

from conftest import TEXTS, random_prompt

peft = pytest.importorskip("peft")


def make_prefix_adapter(hf_dir, out_dir, length: int, projection: bool, seed: int = 0, task_type: str = "CAUSAL_LM"):
    """A PEFT prefix-tuning adapter whose prefix (or reparameterisation MLP) is away from its initial values."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model_class = AutoModelForSeq2SeqLM if task_type == "SEQ_2_SEQ_LM" else AutoModelForCausalLM
    base = model_class.from_pretrained(hf_dir).eval()
    config = peft.PrefixTuningConfig(
        task_type=task_type, num_virtual_tokens=length, prefix_projection=projection, encoder_hidden_size=24
    )
    model = peft.get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.prompt_encoder["default"].parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def peft_reference(hf_dir, adapter):
    """The adapter loaded as PEFT users load it for inference."""
    from transformers import AutoModelForCausalLM

    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), adapter).eval()


def import_task(adapter, bank, export, task: str = "pre") -> None:
    assert bank_main(["import-peft", str(adapter), str(bank), "--task", task, "--model", str(export)]) == 0


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_adapters_serve_what_peft_serves(arch, tmp_path, projection):
    """Logits within 1e-4 of PEFT's and its greedy tokens, for a grouped-query Llama (built graph) and GPT-2 (traced)."""
    hf_dir, export = arch
    adapter = make_prefix_adapter(hf_dir, tmp_path / "adapter", length=5, projection=projection)
    import_task(adapter, tmp_path / "bank", export)
    model = load(export, bank=tmp_path / "bank", providers="cpu")
    config = model.config
    past = model.prefix("pre")
    assert model.prompt("pre") is None and len(past) == 2 * config.num_layers
    assert all(layer.shape == (config.num_kv_heads, 5, config.head_size) for layer in past)
    serves_like_peft(model, "pre", peft_reference(hf_dir, adapter), new_tokens=10)


def test_mixed_batches_of_prefix_prompt_and_plain_rows_equal_each_row_alone(llama_dir, llama_export, tmp_path):
    adapter = make_prefix_adapter(llama_dir, tmp_path / "adapter", length=4, projection=False)
    import_task(adapter, tmp_path / "bank", llama_export)
    save_prompt(tmp_path / "bank", "soft", random_prompt(3, 64), fingerprint=_fingerprint(llama_export))
    model = load(llama_export, bank=tmp_path / "bank", providers="cpu")
    texts = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[0]]
    tasks = ["pre", "soft", None, "soft"]
    together = model.complete(texts, task=tasks, max_new_tokens=8)
    for text, task, got in zip(texts, tasks, together):
        assert got.token_ids == model.complete(text, task=task, max_new_tokens=8)[0].token_ids
    ids = [model.encode(t) for t in texts]
    batch = model.logits_of_ids(ids, task=tasks)
    for i, (row, task) in enumerate(zip(ids, tasks)):
        alone = model.logits_of_ids([row], task=task)[0]
        np.testing.assert_allclose(batch[i, -len(row) :], alone, atol=1e-4 * np.abs(alone).max())
    assert model.is_cached("pre")
    with pytest.raises(RequestError, match="input 0 is empty: prefix task 'pre' needs at least one token"):
        model.complete_ids([[]], task="pre")


def test_prefix_round_trips_through_export_peft_exactly(llama_dir, llama_export, tmp_path):
    adapter = make_prefix_adapter(llama_dir, tmp_path / "adapter", length=3, projection=True)
    import_task(adapter, tmp_path / "bank", llama_export)
    args = ["export-peft", str(tmp_path / "bank"), "pre", str(tmp_path / "out"), "--model", str(llama_export)]
    assert bank_main(args) == 0
    import_task(tmp_path / "out", tmp_path / "again", llama_export)
    first, second = load_prompt(tmp_path / "bank", "pre"), load_prompt(tmp_path / "again", "pre")
    np.testing.assert_array_equal(first.vectors, second.vectors)
    # PEFT itself serves the exported adapter as it served the original one.
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = peft_reference(llama_dir, adapter)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = peft_reference(llama_dir, tmp_path / "out")(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(want, got)


def test_layouts_convert_both_ways():
    table = np.arange(3 * 2 * 2 * 3 * 4, dtype=np.float32).reshape(3, -1)  # P=3, layers=2, kv heads=3, head size=4
    keys_values = prefix_keys_values(table, 2, 3, 4, "adapter")
    assert keys_values.shape == (4, 3, 3, 4)
    # PEFT: view [P, 2 * layers, heads, size]; layer 1's value is index 3 of the second axis.
    np.testing.assert_array_equal(keys_values[3, :, 1], table[1].reshape(4, 3, 4)[3])
    np.testing.assert_array_equal(prefix_table(keys_values), table)


def test_prefix_that_does_not_fit_the_export_is_refused_naming_what_was_expected(llama_dir, llama_export, tmp_path, capsys):
    adapter = make_prefix_adapter(llama_dir, tmp_path / "adapter", length=3, projection=False)
    import_task(adapter, tmp_path / "bank", llama_export)
    prompt = load_prompt(tmp_path / "bank", "pre")
    config = json.loads((llama_export / "softprompt.json").read_text())
    layers, heads, size = config["num_layers"], config["num_kv_heads"], config["head_size"]
    with pytest.raises(BackboneMismatchError, match=rf"a prefix for {layers} layers .* the export has {layers + 1} layers"):
        load_prompt(tmp_path / "bank", "pre", width=64, cache=(layers + 1, heads, size))
    with pytest.raises(BackboneMismatchError, match="this export's graph takes no past keys and values"):
        load_prompt(tmp_path / "bank", "pre", width=64)  # an encoder: no cache to feed
    # A record edited to another shape than its array's.
    record = tmp_path / "bank" / "pre.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "kv_heads": heads + 1, "width": (heads + 1) * size}))
    with pytest.raises(InvalidPromptError, match=rf"array is {2 * layers}x{heads}x3x{size} float32 but pre.json says"):
        load_prompt(tmp_path / "bank", "pre")
    record.write_text(json.dumps({**data, "layers": None}))
    with pytest.raises(InvalidPromptError, match="layers is None; a prefix task's record gives it as a positive integer"):
        load_prompt(tmp_path / "bank", "pre")
    # An adapter for another width.
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({**json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()), "token_dim": None})
    )
    from softprompt.prompt_bank.safetensors_np import safetensors_bytes

    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(
        safetensors_bytes({"prompt_embeddings": np.asarray(prompt.vectors).reshape(3, -1)[:, :-4].copy()})
    )
    capsys.readouterr()
    assert (
        bank_main(["import-peft", str(tmp_path / "adapter"), str(tmp_path / "b2"), "--task", "x", "--model", str(llama_export)])
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    expected = layers * 2 * heads * size
    assert (
        len(err) == 1
        and "adapter_model.safetensors: prompt_embeddings has shape" in err[0]
        and f"needs [P, {expected}]" in err[0]
    )


def test_prefix_tasks_are_refused_where_the_graph_has_no_past(llama_dir, llama_export, tmp_path, capsys):
    from test_encoder import make_bert

    from softprompt.exporter import export_model

    adapter = make_prefix_adapter(llama_dir, tmp_path / "adapter", length=3, projection=False)
    bert = export_model(str(make_bert(tmp_path / "bert")), tmp_path / "bert-export", log=lambda m: None)
    assert bert.prefix_cache is None
    capsys.readouterr()
    args = ["import-peft", str(adapter), str(tmp_path / "bank"), "--task", "x", "--model", str(tmp_path / "bert-export")]
    assert bank_main(args) == 1
    err = capsys.readouterr().err
    assert "is a prefix-tuning adapter; the export" in err and "is a encoder export, and prefix tasks serve decoder" in err
    # An encoder-decoder's adapter (PEFT feeds it differently) is not read as a decoder's prefix, nor the reverse.
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_transformer_submodules": 2}))
    args = ["import-peft", str(adapter), str(tmp_path / "bank"), "--task", "x", "--model", str(llama_export)]
    assert bank_main(args) == 1
    assert "a prefix for an encoder-decoder (num_transformer_submodules 2); the export" in capsys.readouterr().err
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_transformer_submodules": 3}))
    with pytest.raises(PromptBankError, match="num_transformer_submodules is 3; expected 1 .* or 2"):
        from softprompt.prompt_bank.peft import read_peft_adapter

        read_peft_adapter(adapter)


def test_a_prompt_swapped_for_a_prefix_is_served_from_the_next_request(llama_dir, llama_export, tmp_path):
    fingerprint = _fingerprint(llama_export)
    save_prompt(tmp_path / "bank", "pre", random_prompt(3, 64), fingerprint=fingerprint)
    model = load(llama_export, bank=tmp_path / "bank", providers="cpu")
    before = model.complete(TEXTS[0], task="pre", max_new_tokens=6)[0].token_ids
    adapter = make_prefix_adapter(llama_dir, tmp_path / "adapter", length=3, projection=False, seed=4)
    bank_main(["import-peft", str(adapter), str(tmp_path / "bank"), "--task", "pre", "--model", str(llama_export), "--force"])
    assert model.prefix("pre") is not None
    after = model.complete(TEXTS[0], task="pre", max_new_tokens=6)[0].token_ids
    fresh = load(llama_export, bank=tmp_path / "bank", providers="cpu").complete(TEXTS[0], task="pre", max_new_tokens=6)
    assert after == fresh[0].token_ids and model.prompt("pre") is None and len(before) == 6


def _fingerprint(export) -> str:
    return json.loads((export / "softprompt.json").read_text())["fingerprint"]


def test_a_prefix_is_no_starting_point_for_a_prompt(llama_dir, llama_export, tmp_path):
    from softprompt.training.errors import TrainingError
    from softprompt.training.init import init_prompt

    adapter = make_prefix_adapter(llama_dir, tmp_path / "adapter", length=3, projection=False)
    import_task(adapter, tmp_path / "bank", llama_export)
    table = np.zeros((320, 64), np.float32)
    with pytest.raises(TrainingError, match="a prefix task \\(keys and values\\); a prompt starts from a prompt task"):
        init_prompt(
            f"file:{tmp_path}/bank/pre.json",
            3,
            table,
            encode=lambda text: [],
            common_ids=np.arange(10),
            fingerprint=_fingerprint(llama_export),
            rng=np.random.default_rng(0),
        )


def test_a_prefix_with_a_non_finite_value_is_refused_naming_where(tmp_path):
    from softprompt.formats.bank import save_prefix

    keys_values = np.zeros((4, 2, 3, 8), np.float32)
    keys_values[1, 0, 2, 5] = np.nan
    with pytest.raises(InvalidPromptError, match=r"1 non-finite values \(first: nan at index \[1, 0, 2, 5\]\)"):
        save_prefix(tmp_path, "bad", keys_values, fingerprint=None)
