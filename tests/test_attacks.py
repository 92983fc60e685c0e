"""Property-based attacks: whatever bytes a bank, an export folder, an adapter or a request holds, only the
project's own errors come out (or it works), and nothing else breaks."""

from __future__ import annotations

import io
import json
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.formats.errors import PromptBankError, SoftpromptError
from softprompt.prompt_bank import load_prompt, save_prompt
from softprompt.prompt_bank.peft import read_peft_adapter
from softprompt.runtime import load

FP = "sha256:" + "ab" * 32
FAST = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def valid_npy(shape=(2, 4)) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones(shape, np.float32))
    return buffer.getvalue()


@FAST
@given(data=st.binary(max_size=300), cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255))))
def test_any_vectors_file_is_read_or_refused_with_a_bank_error(tmp_path_factory, data, cut, flips):
    bank = tmp_path_factory.mktemp("bank")
    raw = bytearray(valid_npy()[:cut] + data)
    for at, value in flips:
        if at < len(raw):
            raw[at] = value
    (bank / "t.npy").write_bytes(bytes(raw))
    record = {"schema_version": 1, "name": "t", "length": 2, "width": 4, "dtype": "float32", "fingerprint": FP}
    (bank / "t.json").write_text(json.dumps(record))
    try:
        prompt = load_prompt(bank, "t", width=4)
    except PromptBankError:
        return
    assert prompt.vectors.shape == (2, 4) and np.isfinite(prompt.vectors).all()


@FAST
@given(changes=st.dictionaries(st.sampled_from(["schema_version", "name", "length", "width", "dtype", "fingerprint",
                                               "extra", "training", "vectors", "vectors_sha256", "created", "other"]),
                               json_values, max_size=4))  # fmt: skip
def test_any_record_is_read_or_refused_with_a_bank_error(tmp_path_factory, changes):
    bank = tmp_path_factory.mktemp("bank")
    save_prompt(bank, "t", np.ones((2, 4), np.float32), fingerprint=FP, extra={"template": "x {text}"})
    record = json.loads((bank / "t.json").read_text())
    (bank / "t.json").write_text(json.dumps({**record, **changes}))
    try:
        load_prompt(bank, "t", width=4, fingerprint=FP, max_positions=64)
    except PromptBankError:
        pass


@pytest.fixture(scope="module")
def served(llama_export):
    return load(llama_export)


@FAST
@given(key=st.sampled_from(["kind", "hidden_size", "vocab_size", "num_layers", "eos_token_ids", "input_names", "files",
                            "precision", "table_in_graph", "max_positions", "pooling", "opset", "format_version"]),
       value=json_values)  # fmt: skip
def test_any_softprompt_json_field_is_read_or_refused_with_an_export_error(llama_export, tmp_path_factory, key, value):
    folder = tmp_path_factory.mktemp("export") / "e"
    shutil.copytree(llama_export, folder)
    config = json.loads((folder / "softprompt.json").read_text())
    (folder / "softprompt.json").write_text(json.dumps({**config, key: value}))
    try:
        model = load(folder)
    except SoftpromptError:
        return
    try:
        model.generate("hello", max_new_tokens=2)
    except SoftpromptError:
        pass


@FAST
@given(config=json_values, header=json_values, tail=st.binary(max_size=64))
def test_any_adapter_is_read_or_refused_with_a_bank_error(tmp_path_factory, config, header, tail):
    folder = tmp_path_factory.mktemp("adapter")
    base = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **config} if isinstance(config, dict) else config))
    encoded = json.dumps({"prompt_embeddings": header} if not isinstance(header, dict) else header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + tail)
    try:
        read_peft_adapter(folder)
    except PromptBankError:
        pass


@FAST
@given(
    text=st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3) | json_values,
    task=st.none() | json_values,
    overrides=st.dictionaries(
        st.sampled_from(["max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"]),
        json_values,
        max_size=3,
    ),
)
def test_any_request_is_served_or_refused_with_the_projects_error(served, text, task, overrides):
    overrides = {"max_new_tokens": 2, **overrides}
    try:
        served.generate(text, task=task, **overrides)
    except SoftpromptError as exc:
        assert isinstance(exc, (ValueError, TypeError, LookupError)), type(exc)
    assert served.generate("hello", max_new_tokens=1)  # and the model still serves
