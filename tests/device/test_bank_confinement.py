"""A bank's reader opens nothing outside its folder, whatever a record says or a link points to; a write of one task
touches no other task's files, for every legal name; refusals are one line that names the task and quotes no file."""

from __future__ import annotations

import io
import json
import os
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.formats import vectors_file
from softprompt.prompt_bank import PromptBankError, load_prompt, save_prompt
from softprompt.prompt_bank.cli import main as bank_main

FP = "sha256:" + "ab" * 32
SECRET = b"SECRET-contents-of-a-file-outside-the-bank"


def legacy_record(name: str, **changes) -> str:
    base = {"schema_version": 1, "name": name, "length": 2, "width": 4, "dtype": "float32", "fingerprint": FP}
    return json.dumps({**base, **changes})


@pytest.fixture
def outside(tmp_path):
    """A readable .npy and a secret text file outside the bank; the bank is tmp_path/bank."""
    there = tmp_path / "outside"
    there.mkdir()
    np.save(there / "x.npy", np.ones((2, 4), np.float32))
    (there / "secret.txt").write_bytes(SECRET)
    (tmp_path / "bank").mkdir()
    return there


@pytest.fixture
def opened(monkeypatch):
    """Every path the bank's reader opens."""
    paths: list[str] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(vectors_file.os, "open", spy)
    return paths


def refused(bank, name: str) -> str:
    with pytest.raises(PromptBankError) as info:
        load_prompt(bank, name, width=4)
    message = str(info.value)
    assert "\n" not in message and name in message
    return message


@pytest.mark.parametrize("where", ["absolute", "dotdot", "subfolder"])
def test_a_schema_1_record_naming_a_vectors_file_is_refused(tmp_path, outside, opened, where):
    bank = tmp_path / "bank"
    (bank / "sub").mkdir()
    np.save(bank / "sub" / "x.npy", np.ones((2, 4), np.float32))
    named = {"absolute": str(outside / "x.npy"), "dotdot": "../outside/x.npy", "subfolder": "sub/x.npy"}[where]
    (bank / "t.json").write_text(legacy_record("t", vectors=named))
    message = refused(bank, "t")
    assert "schema 1" in message
    assert not any(p.endswith("x.npy") for p in opened)
    assert bank_main(["verify", str(bank)]) == 1


def test_a_record_whose_name_leads_elsewhere_is_refused_before_anything_is_read(tmp_path, outside, opened):
    bank = tmp_path / "bank"
    (bank / "t.json").write_text(legacy_record("../outside/x"))
    assert "name is '../outside/x'" in refused(bank, "t")
    assert not any(p.startswith(str(outside)) for p in opened)


def test_a_record_naming_another_task_says_so(tmp_path):
    bank = tmp_path / "bank"
    bank.mkdir()
    save_prompt(bank, "sentiment", np.ones((2, 4), np.float32), fingerprint=FP)
    (bank / "copy.json").write_text(legacy_record("sentiment"))
    message = refused(bank, "copy")
    assert "name is 'sentiment'; expected 'copy'" in message and "not found" not in message


@pytest.mark.parametrize("target", ["x.npy", "secret.txt"])
def test_a_vectors_file_linked_outside_the_bank_is_refused(tmp_path, outside, opened, capsys, target):
    bank = tmp_path / "bank"
    os.symlink(outside / target, bank / "t.npy")
    (bank / "t.json").write_text(legacy_record("t"))
    message = refused(bank, "t")
    assert "outside the bank" in message and "SECRET" not in message
    assert not any(p.startswith(str(outside)) for p in opened)
    assert bank_main(["verify", str(bank)]) == 1
    assert "SECRET" not in capsys.readouterr().out


def test_a_schema_2_vectors_file_linked_outside_is_refused_even_with_the_right_hash(tmp_path, outside):
    bank = tmp_path / "bank"
    meta = save_prompt(bank, "t", np.ones((2, 4), np.float32), fingerprint=FP)
    os.replace(bank / meta.vectors, outside / "moved.npy")
    os.symlink(outside / "moved.npy", bank / meta.vectors)
    assert "outside the bank" in refused(bank, "t")


def test_a_record_linked_outside_the_bank_is_refused(tmp_path, outside):
    bank = tmp_path / "bank"
    np.save(bank / "t.npy", np.ones((2, 4), np.float32))
    (outside / "t.json").write_text(legacy_record("t"))
    os.symlink(outside / "t.json", bank / "t.json")
    assert "outside the bank" in refused(bank, "t")


def test_a_bank_reached_through_a_link_still_loads(tmp_path):
    """Confinement is to the bank's real folder: a link to the whole bank (banks/current -> v2) is fine."""
    real = tmp_path / "v2"
    save_prompt(real, "t", np.ones((2, 4), np.float32), fingerprint=FP)
    os.symlink(real, tmp_path / "current")
    assert load_prompt(tmp_path / "current", "t", width=4).vectors.shape == (2, 4)


def test_a_text_file_as_vectors_is_refused_without_quoting_it(tmp_path):
    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / "t.npy").write_bytes(SECRET)
    (bank / "t.json").write_text(legacy_record("t"))
    message = refused(bank, "t")
    assert "SECRET" not in message and "not a .npy file" in message


@pytest.mark.parametrize("header", ["past the file's end", "20,000 bytes"])
def test_a_header_numpy_refuses_is_one_line_without_numpys_advice(tmp_path, header):
    bank = tmp_path / "bank"
    bank.mkdir()
    buffer = io.BytesIO()
    np.save(buffer, np.ones((2, 4), np.float32))
    data = bytearray(buffer.getvalue())
    if header == "20,000 bytes":  # a well-formed header padded with spaces: numpy refuses it as unsafe to parse
        text = data[10:128].decode("latin1").rstrip("\n").ljust(20_000 - 11) + "\n"
        data = bytearray(b"\x93NUMPY\x02\x00" + (len(text)).to_bytes(4, "little") + text.encode("latin1") + data[128:])
    else:
        data[8:10] = (60000).to_bytes(2, "little")  # a version 1.0 header's length, far past the file's end
    (bank / "t.npy").write_bytes(bytes(data))
    (bank / "t.json").write_text(legacy_record("t"))
    message = refused(bank, "t")
    assert "allow_pickle" not in message and "header cannot be read" in message


@pytest.mark.parametrize("entry", ["t.json\n", "my task.json", "-t.json", "x" * 200 + ".json", "t .npy"])
def test_verify_and_list_name_files_no_reader_serves(tmp_path, capsys, entry):
    bank = tmp_path / "bank"
    save_prompt(bank, "good", np.ones((2, 4), np.float32), fingerprint=FP)
    (bank / entry).write_text(legacy_record("t"))
    assert bank_main(["verify", str(bank)]) == 1
    out = capsys.readouterr().out
    assert repr(entry) in out and "ok    good" in out
    assert bank_main(["list", str(bank)]) == 1
    assert repr(entry) in capsys.readouterr().out


# ---- one task's write never touches another's files -------------------------------------------------------------

HEX = "0123456789abcdef"
names = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=24).filter(
    lambda n: n[0].isalnum() and not n.endswith((".npy", ".json"))
)


def files_of(bank, name: str) -> set[str]:
    """What task `name` owns at this moment: its record, the vectors it names, and a write of it in flight."""
    meta = load_prompt(bank, name).meta
    return {f"{name}.json", str(meta.vectors), f".{name}.json.abcdefgh.tmp", f".{name}.{HEX}.npy.abcd_123.tmp"}


@settings(
    max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=names, suffix=st.sampled_from(["", ".json-like", "hash", "hash.hash"]), other=names)
def test_writing_a_task_never_removes_another_tasks_files(tmp_path_factory, first, suffix, other):
    bank = tmp_path_factory.mktemp("bank")
    meta = save_prompt(bank, first, np.ones((2, 4), np.float32), fingerprint=FP)
    version = meta.vectors_sha256[:16]
    # The second name is made to look like the first task's files where it can: NAME.<its hash>, NAME.<hash>.<hash>.
    second = {"": other, ".json-like": f"{first}.json-x", "hash": f"{first}.{version}", "hash.hash": f"{first}.{HEX}.{version}"}[
        suffix
    ]
    if second == first:
        return
    save_prompt(bank, second, np.full((2, 4), 2, np.float32), fingerprint=FP)
    for writer, victim in ((first, second), (second, first)):
        for name in (first, second):  # each with a write in flight
            for temporary in files_of(bank, name) - set(os.listdir(bank)):
                (bank / temporary).write_bytes(b"")
        owned = files_of(bank, victim)
        save_prompt(bank, writer, np.full((2, 4), 3, np.float32), fingerprint=FP)
        remaining = set(os.listdir(bank))
        assert owned <= remaining, f"a write of {writer!r} removed {sorted(owned - remaining)} of {victim!r}"
        assert load_prompt(bank, victim, width=4).vectors.shape == (2, 4)
        assert not {f".{writer}.json.abcdefgh.tmp", f".{writer}.{HEX}.npy.abcd_123.tmp"} & remaining  # its own leftovers go
