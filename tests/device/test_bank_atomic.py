"""A task changes as one unit: readers see the old or the new version whole, and a killed write loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from softprompt.formats import atomic
from softprompt.formats import bank as bank_format
from softprompt.prompt_bank import InvalidPromptError, list_tasks, load_prompt, save_prompt

FP = "sha256:" + "ab" * 32
OLD, NEW = np.full((3, 8), 1.0, np.float32), np.full((5, 8), 2.0, np.float32)


def test_a_write_stopped_before_its_record_leaves_the_old_version_and_the_next_write_cleans_up(tmp_path, monkeypatch):
    save_prompt(tmp_path, "t", OLD, fingerprint=FP)
    real = atomic.write_atomic

    def dies_at_the_record(path, write, mode="wb"):
        if path.name.endswith(".json"):
            raise KeyboardInterrupt  # killed between the vectors and the record
        return real(path, write, mode)

    monkeypatch.setattr(bank_format, "write_atomic", dies_at_the_record)
    with pytest.raises(KeyboardInterrupt):
        save_prompt(tmp_path, "t", NEW, fingerprint="sha256:" + "cd" * 32)
    monkeypatch.setattr(bank_format, "write_atomic", real)
    prompt = load_prompt(tmp_path, "t", fingerprint=FP)
    np.testing.assert_array_equal(prompt.vectors, OLD)  # old vectors with the old record
    assert len(list(tmp_path.glob("t.*.npy"))) == 2  # the new vectors wait, unnamed
    (tmp_path / ".t.json.abcd1234.tmp").write_text("{half")  # a killed write's temporary file
    save_prompt(tmp_path, "t", NEW, fingerprint=FP)
    record = json.loads((tmp_path / "t.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["t.json", record["vectors"]])


def test_vectors_changed_under_their_record_are_refused(tmp_path):
    save_prompt(tmp_path, "t", OLD, fingerprint=FP)
    (vectors,) = tmp_path.glob("t.*.npy")
    np.save(vectors, np.full((3, 8), 7.0, np.float32))  # same shape, other values: only the hash tells
    with pytest.raises(InvalidPromptError, match=r"t\.[0-9a-f]{16}\.npy: its sha256 is not the"):
        load_prompt(tmp_path, "t")


def test_schema_1_banks_still_load_and_a_write_upgrades_them(tmp_path):
    np.save(tmp_path / "t.npy", OLD)
    record = {"schema_version": 1, "name": "t", "length": 3, "width": 8, "dtype": "float32", "fingerprint": FP}
    (tmp_path / "t.json").write_text(json.dumps(record))
    np.testing.assert_array_equal(load_prompt(tmp_path, "t").vectors, OLD)
    save_prompt(tmp_path, "t", NEW, fingerprint=FP)
    assert not (tmp_path / "t.npy").exists() and json.loads((tmp_path / "t.json").read_text())["schema_version"] == 2
    np.testing.assert_array_equal(load_prompt(tmp_path, "t").vectors, NEW)


def test_cleaning_up_leaves_other_tasks_files_alone(tmp_path):
    save_prompt(tmp_path, "a", OLD, fingerprint=FP)
    save_prompt(tmp_path, "a.b", OLD, fingerprint=FP)  # a task whose name starts like another's
    np.save(tmp_path / "a.0123456789abcdef.npy", OLD)  # schema 1 vectors of a task named a.0123456789abcdef
    record = {"schema_version": 1, "name": "a.0123456789abcdef", "length": 3, "width": 8, "dtype": "float32"}
    (tmp_path / "a.0123456789abcdef.json").write_text(json.dumps({**record, "fingerprint": FP}))
    save_prompt(tmp_path, "a", NEW, fingerprint=FP)
    assert list_tasks(tmp_path) == ["a", "a.0123456789abcdef", "a.b"]
    for name, want in (("a", NEW), ("a.b", OLD), ("a.0123456789abcdef", OLD)):
        np.testing.assert_array_equal(load_prompt(tmp_path, name).vectors, want)


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from softprompt.prompt_bank import save_prompt
    old, new = np.full((3, 8), 1.0, np.float32), np.full((5, 8), 2.0, np.float32)
    print("ready", flush=True)
    flip = 0
    while True:
        flip ^= 1
        save_prompt(sys.argv[1], "t", new if flip else old, fingerprint="sha256:" + "ab" * 32)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")
def test_kill_9_at_random_points_always_leaves_a_whole_version(tmp_path):
    save_prompt(tmp_path, "t", OLD, fingerprint=FP)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(25):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0, 0.03)))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        assert list_tasks(tmp_path) == ["t"]
        vectors = load_prompt(tmp_path, "t", fingerprint=FP).vectors
        assert any(vectors.shape == v.shape and (vectors == v).all() for v in (OLD, NEW))
        seen.add(vectors.shape[0])
    save_prompt(tmp_path, "t", OLD, fingerprint=FP)  # the next write clears what the killed ones left
    record = json.loads((tmp_path / "t.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["t.json", record["vectors"]])
    assert seen  # (which versions survived depends on timing; that each was whole is the point)


def test_upgrade_rewrites_schema_1_tasks_keeping_their_record(tmp_path):
    from softprompt.prompt_bank.cli import main as bank_main

    np.save(tmp_path / "t.npy", OLD)
    record = {"schema_version": 1, "name": "t", "length": 3, "width": 8, "dtype": "float32", "fingerprint": FP}
    (tmp_path / "t.json").write_text(json.dumps({**record, "created": "2026-01-01T00:00:00+00:00", "init": "vocab"}))
    save_prompt(tmp_path, "u", NEW, fingerprint=FP)
    assert bank_main(["upgrade", str(tmp_path)]) == 0
    meta = load_prompt(tmp_path, "t").meta
    assert (meta.schema_version, meta.created, meta.init) == (2, "2026-01-01T00:00:00+00:00", "vocab")
    np.testing.assert_array_equal(load_prompt(tmp_path, "t").vectors, OLD)
    assert not (tmp_path / "t.npy").exists() and list_tasks(tmp_path) == ["t", "u"]
