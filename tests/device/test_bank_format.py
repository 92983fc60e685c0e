"""The bank format: round trips, the on-disk layout, and every refusal with the file and value named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from softprompt.prompt_bank import (
    BackboneMismatchError,
    InvalidPromptError,
    UnknownTaskError,
    backbone_fingerprint,
    list_tasks,
    load_bank,
    load_prompt,
    remove_prompt,
    save_prompt,
)

FP = "sha256:" + "ab" * 32


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_keeps_values_and_record(tmp_path, dtype):
    vectors = np.random.default_rng(1).standard_normal((7, 16)).astype(dtype)
    save_prompt(
        tmp_path,
        "sentiment",
        vectors,
        fingerprint=FP,
        init="text",
        source="unit test",
        training={"steps": 3},
        extra={"template": "{text}"},
    )
    prompt = load_prompt(tmp_path, "sentiment", width=16, fingerprint=FP)
    assert prompt.vectors.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(prompt.vectors, vectors)
    meta = prompt.meta
    assert (meta.name, meta.length, meta.width, meta.dtype, meta.fingerprint) == ("sentiment", 7, 16, dtype, FP)
    assert (meta.init, meta.source, meta.training, meta.extra) == ("text", "unit test", {"steps": 3}, {"template": "{text}"})
    assert meta.created.endswith("+00:00")
    assert not prompt.vectors.flags.writeable


def test_dtype_conversion_on_save(tmp_path):
    save_prompt(tmp_path, "t", np.ones((2, 4), np.float64), fingerprint=FP, dtype="float16")
    assert load_prompt(tmp_path, "t").vectors.dtype == np.float16


def test_hand_written_bank_loads(tmp_path):
    """The documented layout is the format: a plain np.save array plus a JSON record."""
    np.save(tmp_path / "greet.npy", np.full((3, 8), 0.25, np.float32))
    (tmp_path / "greet.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "name": "greet",
                "length": 3,
                "width": 8,
                "dtype": "float32",
                "fingerprint": FP,
            }
        )
    )
    assert load_prompt(tmp_path, "greet", width=8, fingerprint=FP).vectors.sum() == pytest.approx(6.0)


def test_writes_leave_no_temporary_files_and_dot_files_are_ignored(tmp_path):
    save_prompt(tmp_path, "a", np.ones((1, 4), np.float32), fingerprint=FP)
    (tmp_path / ".b.npy.x1.tmp").write_bytes(b"half a copy")
    np.save(tmp_path / ".hidden.npy", np.ones((1, 4), np.float32))
    record = json.loads((tmp_path / "a.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(["a.json", record["vectors"]])
    assert list_tasks(tmp_path) == ["a"]


def test_overwrite_refused_without_flag(tmp_path):
    save_prompt(tmp_path, "a", np.ones((1, 4), np.float32), fingerprint=FP)
    with pytest.raises(InvalidPromptError, match="exists"):
        save_prompt(tmp_path, "a", np.zeros((1, 4), np.float32), fingerprint=FP, overwrite=False)
    assert load_prompt(tmp_path, "a").vectors.sum() == 4


def test_remove(tmp_path):
    save_prompt(tmp_path, "a", np.ones((1, 4), np.float32), fingerprint=FP)
    remove_prompt(tmp_path, "a")
    assert list_tasks(tmp_path) == []
    with pytest.raises(UnknownTaskError):
        remove_prompt(tmp_path, "a")


def _write(tmp_path, name, array, **meta):
    np.save(tmp_path / f"{name}.npy", array, allow_pickle=True)
    record = {"schema_version": 1, "name": name, "length": 2, "width": 4, "dtype": "float32", "fingerprint": FP}
    record.update(meta)
    (tmp_path / f"{name}.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array([{"evil": 1}, None], dtype=object), "pickled or object array"),
        (np.ones(8, np.float32), "has 1 dimensions; expected 2"),
        (np.ones((2, 4, 1), np.float32), "has 3 dimensions; expected 2"),
        (np.ones((2, 4), np.int32), "dtype int32"),
        (np.array([[1, 2, np.nan, 4], [1, 2, 3, 4]], np.float32), "non-finite"),
        (np.array([[1, 2, 3, 4], [1, np.inf, 3, 4]], np.float32), "non-finite"),
    ],
)
def test_bad_arrays_are_refused_naming_the_file(tmp_path, array, message):
    _write(tmp_path, "bad", array)
    with pytest.raises(InvalidPromptError, match=message) as info:
        load_prompt(tmp_path, "bad")
    assert "bad.npy" in str(info.value)


def test_truncated_file_is_refused(tmp_path):
    _write(tmp_path, "cut", np.ones((2, 4), np.float32))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidPromptError, match="cut.npy.*truncated"):
        load_prompt(tmp_path, "cut")


def test_wrong_width_is_refused_with_both_widths(tmp_path):
    save_prompt(tmp_path, "w", np.ones((2, 4), np.float32), fingerprint=FP)
    with pytest.raises(BackboneMismatchError, match="E=4.*width is 8"):
        load_prompt(tmp_path, "w", width=8)


def test_other_backbone_is_refused(tmp_path):
    save_prompt(tmp_path, "w", np.ones((2, 4), np.float32), fingerprint=FP)
    with pytest.raises(BackboneMismatchError, match="made for backbone sha256:abab"):
        load_prompt(tmp_path, "w", fingerprint="sha256:" + "cd" * 32)


def test_unknown_task_lists_the_tasks_there(tmp_path):
    for name in ("alpha", "beta"):
        save_prompt(tmp_path, name, np.ones((1, 4), np.float32), fingerprint=FP)
    with pytest.raises(UnknownTaskError, match="no task 'gamma'.*alpha, beta"):
        load_prompt(tmp_path, "gamma")


def test_record_must_match_the_array(tmp_path):
    _write(tmp_path, "m", np.ones((3, 4), np.float32))  # the record says 2 rows
    with pytest.raises(InvalidPromptError, match="array is 3x4 float32 but m.json says 2x4 float32"):
        load_prompt(tmp_path, "m")


def test_missing_or_broken_record(tmp_path):
    np.save(tmp_path / "lonely.npy", np.ones((1, 4), np.float32))
    with pytest.raises(InvalidPromptError, match="lonely.npy: has no lonely.json record beside it"):
        load_prompt(tmp_path, "lonely")
    (tmp_path / "lonely.json").write_text("{not json")
    with pytest.raises(InvalidPromptError, match="not valid JSON"):
        load_prompt(tmp_path, "lonely")
    (tmp_path / "lonely.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(InvalidPromptError, match="schema_version 99"):
        load_prompt(tmp_path, "lonely")


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "x.npy", "", "task\n", "tab\tname"])
def test_task_names_must_be_plain(tmp_path, name):
    with pytest.raises(InvalidPromptError, match="invalid task name"):
        save_prompt(tmp_path, name, np.ones((1, 4), np.float32), fingerprint=FP)


def test_load_bank_fails_on_any_bad_task(tmp_path):
    save_prompt(tmp_path, "good", np.ones((1, 4), np.float32), fingerprint=FP)
    _write(tmp_path, "bad", np.ones(8, np.float32))
    with pytest.raises(InvalidPromptError, match="bad.npy"):
        load_bank(tmp_path)


def test_fingerprint_depends_on_table_and_config():
    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    config = {"architecture": "LlamaForCausalLM", "hidden_size": 4, "vocab_size": 10, "num_layers": 2}
    base = backbone_fingerprint(table, config)
    assert base == backbone_fingerprint(table.copy(), dict(config))
    changed = table.copy()
    changed[3, 1] += 1e-6
    assert backbone_fingerprint(changed, config) != base
    assert backbone_fingerprint(table, {**config, "num_layers": 3}) != base


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's owner-only mode: a service account must be able to read a bank written by another user."""
    import os

    umask = os.umask(0o022)
    try:
        save_prompt(tmp_path, "t", np.ones((2, 4), np.float32), fingerprint=None)
        assert [p.stat().st_mode & 0o777 for p in tmp_path.glob("t.*.npy")] == [0o644]
        os.chmod(tmp_path / "t.json", 0o600)  # a replaced file keeps the mode its owner chose
        save_prompt(tmp_path, "t", np.ones((2, 4), np.float32), fingerprint=None)
        assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)


def test_peft_adapters_convert_from_python_as_the_commands_do(tmp_path):
    """import_peft / export_peft: the library functions under prompt-bank import-peft and export-peft (numpy only)."""
    from pathlib import Path

    from softprompt.prompt_bank import export_peft, import_peft, read_peft_adapter, write_peft_adapter
    from softprompt.runtime import read_config

    export = Path(__file__).resolve().parents[1] / "fixture" / "export"
    config = read_config(export)
    vectors = np.random.default_rng(3).standard_normal((5, config.hidden_size)).astype(np.float32)
    write_peft_adapter(tmp_path / "adapter", vectors, num_layers=config.num_layers, num_attention_heads=config.num_heads)
    meta = import_peft(tmp_path / "adapter", tmp_path / "bank", "t", export, template="Q: {text}\nA:")
    assert (meta.length, meta.width, meta.fingerprint) == (5, config.hidden_size, config.fingerprint)
    np.testing.assert_array_equal(load_prompt(tmp_path / "bank", "t").vectors, vectors)
    with pytest.raises(InvalidPromptError, match="exists; pass overwrite"):
        import_peft(tmp_path / "adapter", tmp_path / "bank", "t", export)
    written = export_peft(tmp_path / "bank", "t", tmp_path / "again", export_dir=export)
    assert written.dropped == ("template",) and not written.prefix
    np.testing.assert_array_equal(read_peft_adapter(tmp_path / "again").vectors, vectors)
    narrow = np.ones((2, config.hidden_size // 2), np.float32)
    write_peft_adapter(tmp_path / "narrow", narrow, num_layers=config.num_layers, num_attention_heads=config.num_heads)
    with pytest.raises(BackboneMismatchError, match=f"prompt width E={config.hidden_size // 2}"):
        import_peft(tmp_path / "narrow", tmp_path / "bank", "n", export)
