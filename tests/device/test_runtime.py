"""Runtime behaviour: batching, streaming, stop strings, sampling, refusals and provider handling.

Torch-free: runs on the committed tiny export (tests/fixture, made by tests/make_fixture.py), in the
device environment of `make test` as well as in the full one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from softprompt.prompt_bank import UnknownTaskError, save_prompt
from softprompt.runtime import ProviderError, RequestError, load
from softprompt.runtime import session as session_module
from softprompt.runtime.rows import pad, position_ids

from conftest import TEXTS, random_prompt

FIXTURE = Path(__file__).resolve().parents[1] / "fixture"


@pytest.fixture
def llama_export() -> Path:
    return FIXTURE / "export"


@pytest.fixture
def bank(llama_export, tmp_path):
    from softprompt.runtime import read_config

    config = read_config(llama_export)
    save_prompt(tmp_path, "short", random_prompt(2, config.hidden_size, seed=1), fingerprint=config.fingerprint)
    save_prompt(tmp_path, "long", random_prompt(9, config.hidden_size, seed=2), fingerprint=config.fingerprint)
    return tmp_path


@pytest.fixture
def model(llama_export, bank):
    return load(llama_export, bank=bank, providers=["CPUExecutionProvider"])


def test_left_padded_batch_equals_each_row_alone(model):
    batch = model.complete(TEXTS, task="long", max_new_tokens=10)
    for text, row in zip(TEXTS, batch):
        alone = model.complete(text, task="long", max_new_tokens=10)[0]
        assert row.token_ids == alone.token_ids
        assert row.text == alone.text
        assert (row.input, row.task) == (text, "long")


def test_rows_with_different_tasks_in_one_batch(model):
    tasks = ["short", "long", None, "short"]
    batch = model.complete(TEXTS, task=tasks, max_new_tokens=8)
    for text, task, row in zip(TEXTS, tasks, batch):
        assert row.token_ids == model.complete(text, task=task, max_new_tokens=8)[0].token_ids


def test_the_prompt_changes_the_output(model):
    assert model.generate(TEXTS[0], task="long", max_new_tokens=8) != model.generate(TEXTS[0], max_new_tokens=8)


def test_generate_returns_str_for_str_and_list_for_list(model):
    assert isinstance(model.generate(TEXTS[1], max_new_tokens=3), str)
    assert len(model.generate(TEXTS[:2], max_new_tokens=3)) == 2


def test_stream_pieces_join_to_the_generated_text(model):
    pieces = list(model.stream(TEXTS[0], task="short", max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate(TEXTS[0], task="short", max_new_tokens=12)


def test_stop_string_cuts_the_text(model):
    full = model.complete(TEXTS[3], max_new_tokens=16)[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = model.complete(TEXTS[3], max_new_tokens=16, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in "".join(model.stream(TEXTS[3], max_new_tokens=16, stop=stop))


def test_min_new_tokens_and_length_finish(model):
    result = model.complete(TEXTS[2], max_new_tokens=5, min_new_tokens=5)[0]
    assert len(result.token_ids) == 5 and result.finish_reason == "length"


def test_sampling_is_reproducible_with_a_seed(model):
    settings = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95)
    first = model.complete(TEXTS[:2], seed=7, **settings)
    again = model.complete(TEXTS[:2], seed=7, **settings)
    other = model.complete(TEXTS[:2], seed=8, **settings)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_top_k_one_is_greedy(model):
    greedy = model.complete(TEXTS[0], max_new_tokens=8)[0].token_ids
    assert model.complete(TEXTS[0], max_new_tokens=8, temperature=0.7, top_k=1, seed=3)[0].token_ids == greedy


def test_too_long_request_is_refused_before_running(model):
    limit = model.config.max_positions
    with pytest.raises(RequestError, match=rf"9 prompt \+ \d+ input \+ {limit} new = \d+ positions; the model has {limit}"):
        model.generate(TEXTS[0], task="long", max_new_tokens=limit)


def test_unknown_task_lists_the_tasks(model):
    with pytest.raises(UnknownTaskError, match="no task 'nope'.*long, short"):
        model.generate("hi", task="nope")


def test_task_without_a_bank(llama_export):
    with pytest.raises(UnknownTaskError, match="no bank was loaded"):
        load(llama_export).generate("hi", task="any")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens 0"),
        ({"temperature": -1}, "temperature -1"),
        ({"top_p": 1.5, "temperature": 1}, "top_p 1.5"),
        ({"top_k": 0, "temperature": 1}, "top_k 0"),
        ({"task": ["short"]}, "1 tasks for 2 inputs"),
    ],
)
def test_bad_settings_are_refused(model, settings, message):
    with pytest.raises(RequestError, match=message):
        model.complete(TEXTS[:2], **settings)


def test_missing_provider_names_the_available_ones():
    with pytest.raises(ProviderError, match=r"not available.*available: \[.*CPUExecutionProvider"):
        session_module.resolve_providers(["TensorrtExecutionProvider"])


def test_default_providers_prefer_cuda_when_present(monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session_module.resolve_providers(None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert session_module.resolve_providers(None) == ["CPUExecutionProvider"]
    assert session_module.resolve_providers("cpu") == ["CPUExecutionProvider"]


def test_cuda_that_fell_back_to_cpu_warns(monkeypatch, llama_export):
    class FallbackSession:
        def __init__(self, path, options, providers):
            self.requested = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(onnxruntime, "InferenceSession", FallbackSession)
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider was requested but the session runs on"):
        session = session_module.create_session(llama_export / "model.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    # CUDA is asked for in full fp32 (TF32 off), so its greedy tokens can match the CPU's.
    assert session.requested == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]


def test_positions_continue_over_real_tokens_only():
    rows = [np.ones((3, 2), np.float32), np.ones((5, 2), np.float32)]
    embeds, mask = pad(rows, "left")
    assert embeds.shape == (2, 5, 2) and mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert position_ids(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    grown = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    assert position_ids(grown, 5).tolist() == [[3], [5]]


def test_inputs_embeds_are_prompt_then_token_rows(model):
    ids = model.encode(TEXTS[0])
    embeds = model.inputs_embeds(ids, task="short")
    np.testing.assert_array_equal(embeds[:2], model.prompt("short"))
    np.testing.assert_array_equal(embeds[2:], np.asarray(model.table)[ids])


def test_row_text_at_end_of_sequence_and_stop_strings():
    from softprompt.runtime.generate import RowText

    calls = []

    def decode(ids):  # keeps every id, special or not: the text must still stop before end of sequence
        calls.append(len(ids))
        return "".join(chr(ord("a") + i) for i in ids)

    row = RowText(decode, eos_ids={25}, stops=[])
    for token in [0, 1, 2, 3, 25, 4]:
        row.add(token)
    assert (row.text, row.ids, row.finish_reason) == ("abcd", [0, 1, 2, 3, 25], "stop")
    assert len(calls) == 1  # without stop strings the text is decoded when read, not every step

    stopped = RowText(decode, eos_ids={25}, stops=["cd"])
    for token in [0, 1, 2, 3, 4]:
        stopped.add(token)
    assert (stopped.text, stopped.ids, stopped.finish_reason) == ("ab", [0, 1, 2, 3], "stop")


def test_min_new_tokens_masks_end_of_sequence_only_when_it_would_win():
    from softprompt.runtime.sampling import chooser
    from softprompt.runtime.settings import GenerationSettings

    logits = np.array([[0.0, 5.0, 9.0, 1.0], [7.0, 2.0, 3.0, 0.0]], np.float32)  # row 0: EOS (2) wins
    choose = chooser(GenerationSettings(max_new_tokens=4, min_new_tokens=2), eos=[2])
    assert choose(logits).tolist() == [1, 0]  # masked: the best other token
    assert choose(logits).tolist() == [1, 0]
    assert choose(logits).tolist() == [2, 0]  # from min_new_tokens on, EOS may win
    assert logits[0, 2] == 9.0  # the caller's logits are left alone
