"""An export folder stays inside itself: every file softprompt.json names is a plain name in the folder.

Torch-free: copies of the committed tiny export, edited the way a hostile or careless folder would be.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from softprompt.formats.errors import ExportFormatError
from softprompt.formats.export_folder import open_export
from softprompt.runtime import RequestError, load

FIXTURE = Path(__file__).resolve().parents[1] / "fixture" / "export"


def edited(tmp_path: Path, **files) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(FIXTURE, folder)
    config = json.loads((folder / "softprompt.json").read_text())
    config["files"].update(files)
    (folder / "softprompt.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", ["../export/model.onnx", "/etc/passwd", "sub/model.onnx", "..", "", 7])
def test_names_that_are_not_plain_file_names_are_refused(tmp_path, name):
    folder = edited(tmp_path, model=name)
    with pytest.raises(ExportFormatError, match=r"files\.model is .*; expected a plain file name inside the export folder"):
        load(folder)


def test_a_link_that_leads_outside_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(FIXTURE / "model.onnx", outside)
    folder = edited(tmp_path, model="linked.onnx")
    os.symlink(outside, folder / "linked.onnx")
    with pytest.raises(ExportFormatError, match=r"files\.model 'linked\.onnx' leads outside the export folder"):
        open_export(folder)
    os.symlink(folder / "model.onnx", folder / "inside.onnx")  # a link within the folder is fine
    config = json.loads((folder / "softprompt.json").read_text())
    config["files"]["model"] = "inside.onnx"
    (folder / "softprompt.json").write_text(json.dumps(config))
    assert load(folder).complete("dull", max_new_tokens=2)[0].token_ids


def test_files_of_the_wrong_type_are_refused(tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(FIXTURE, folder)
    config = json.loads((folder / "softprompt.json").read_text())
    config["files"] = ["model.onnx"]
    (folder / "softprompt.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match=r"files is \['model.onnx'\]; expected an object of file names"):
        open_export(folder)


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -0.5])
def test_temperatures_that_are_no_finite_positive_number_are_refused(temperature):
    model = load(FIXTURE)
    with pytest.raises(RequestError, match="temperature"):
        model.complete("dull", temperature=temperature, max_new_tokens=2)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_positions", -5),
        ("max_positions", 0),
        ("bos_token_id", -1),
        ("eos_token_ids", [2, -1]),
        ("eos_token_ids", [10**6]),
        ("pad_token_id", 10**6),
    ],
)
def test_numbers_no_request_could_use_are_refused_at_load(tmp_path, key, value):
    """A negative max_positions loaded and then refused every request; it is the folder that is wrong."""
    folder = tmp_path / "export"
    shutil.copytree(FIXTURE, folder)
    config = json.loads((folder / "softprompt.json").read_text())
    config[key] = value
    (folder / "softprompt.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match=rf"{key}(\[\d+\])? is .*; expected"):
        load(folder)
