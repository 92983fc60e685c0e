"""The repository's shape, read from the source: imports between rooms point one way, bench/ and tests/
stay apart, and pyproject.toml declares exactly the packages the code imports.

Every import counts, at module level or inside a function: an import tucked into a function to
dodge a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The rooms as installed, softprompt.<room>, each in the folder src/softprompt/<room>.
SOURCE = ROOT / PYPROJECT["tool"]["setuptools"]["package-dir"][""]
ROOMS = {
    package.split(".")[1]: f"{SOURCE.name}/softprompt/{package.split('.')[1]}"
    for package in PYPROJECT["tool"]["setuptools"]["packages"]
    if "." in package
}

# Which rooms each room may import. Read top to bottom: nothing imports a room listed above it.
ALLOWED = {
    "formats": set(),  # the export folder and bank formats: imported by everything
    "prompt_bank": {"formats"},  # bank tools: verify, PEFT conversion, the prompt-bank CLI
    "runtime": {"formats"},  # what ships to devices
    "exporter": {"formats"},  # torch -> ONNX, validated against PyTorch
    "training": {"formats", "exporter", "runtime"},  # loads models as the exporter does, scores as the runtime does
    "server": {"formats", "runtime"},  # the HTTP server: the runtime behind the OpenAI API
    "cluster": {"formats", "runtime", "server"},  # the server and batch runs on Ray
}

# Third-party imports each room may make, as distribution names (`[cpu]`/`[gpu]` both give onnxruntime).
IMPORT_NAMES = {"onnx_ir": "onnx-ir", "onnxruntime": "onnxruntime", "onnxruntime_genai": "onnxruntime-genai"}
# Declared but never imported by our code: transformers loads them itself.
LOADED_BY_TRANSFORMERS = {"sentencepiece", "protobuf"}  # SentencePiece and GGUF tokenizer conversion
TOOLS = {"ruff", "mypy"}  # run by make lint, never imported
# An optional import behind an ImportError with an install hint, and why it is allowed.
OPTIONAL = {
    ("prompt_bank", "torch"): "a PEFT adapter saved as a torch pickle (adapter_model.bin) needs torch to read",
    ("runtime", "onnxruntime-genai"): "load(loop='genai'), onnxruntime-genai's native loop: the genai extra",
}


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, relative level) of every import statement in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def room_imports(room: str) -> dict[str, set[str]]:
    """Room name -> the files (relative paths) of `room` that import it."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / ROOMS[room]).rglob("*.py")):
        for module, level in imports(path):
            if level > 1:
                out.setdefault("<beyond the room: relative import " + "." * level + module + ">", set()).add(path.name)
            elif level == 0 and module.split(".")[0] == "softprompt":
                target = module.split(".")[1] if "." in module else "<softprompt>"
                if target != room:
                    out.setdefault(target, set()).add(str(path.relative_to(ROOT)))
    return out


def third_party(folder: Path) -> dict[str, set[str]]:
    """Top-level third-party module -> files importing it."""
    out: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for module, level in imports(path):
            top = module.split(".")[0]
            if level == 0 and top and top not in sys.stdlib_module_names and top != "softprompt":
                out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def distribution(requirement: str) -> str:
    for stop in "<>=!~[; ":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower()


def test_every_room_is_a_package_and_listed_here():
    assert set(ROOMS) == set(ALLOWED), "a room was added or removed: say here which rooms it may import"
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    assert sorted(packages) == sorted(["softprompt", *(f"softprompt.{room}" for room in ROOMS)])
    on_disk = {path.name for path in (SOURCE / "softprompt").iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert on_disk == set(ROOMS), "every folder under src/softprompt is a room, listed in pyproject.toml"
    for folder in ROOMS.values():
        assert (ROOT / folder / "__init__.py").is_file()
    assert not imports(SOURCE / "softprompt" / "__init__.py"), "the namespace itself imports nothing"


def test_rooms_import_only_the_rooms_below_them():
    wrong = {
        room: {target: sorted(files) for target, files in room_imports(room).items() if target not in ALLOWED[room]}
        for room in ROOMS
    }
    assert not {room: found for room, found in wrong.items() if found}


def test_the_allowed_imports_have_no_cycle():
    def reaches(start: str, seen: frozenset = frozenset()) -> set[str]:
        out = set()
        for target in ALLOWED[start]:
            assert target not in seen | {start}, f"cycle through {start} -> {target}"
            out |= {target} | reaches(target, seen | {start})
        return out

    for room in ALLOWED:
        assert room not in reaches(room)


def test_bench_and_tests_do_not_import_each_other():
    tests_modules = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"tests"}
    bench_modules = {p.stem for p in (ROOT / "bench").rglob("*.py")} | {"bench"}
    for folder, foreign in (("tests", bench_modules - tests_modules), ("bench", tests_modules - bench_modules)):
        for path in (ROOT / folder).rglob("*.py"):
            if path == Path(__file__).resolve():
                continue  # names the tricks it looks for
            source = path.read_text()
            named = {module.split(".")[0] for module, level in imports(path) if level == 0}
            assert not named & foreign, f"{path.relative_to(ROOT)} imports {sorted(named & foreign)}"
            for trick in ("sys.path.insert", "sys.path.append", "spec_from_file_location"):
                assert trick not in source, f"{path.relative_to(ROOT)} loads code by path ({trick})"


def test_pyproject_declares_what_the_code_imports():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    declared = {"core": {distribution(r) for r in project["dependencies"]}}
    declared |= {name: {distribution(r) for r in reqs} for name, reqs in extras.items()}
    onnxruntime = declared["cpu"] | declared["gpu"]  # either provides the onnxruntime module
    # What each room's install gives it.
    gives = {
        "formats": declared["core"],
        "prompt_bank": declared["core"],
        "runtime": declared["core"] | onnxruntime,
        "exporter": declared["core"] | declared["export"] | onnxruntime,
        "training": declared["core"] | declared["train"] | declared["export"] | onnxruntime,
        "server": declared["core"] | declared["serve"] | onnxruntime,
        "cluster": declared["core"] | declared["serve"] | declared["ray"] | onnxruntime,
    }
    used: set[str] = set()
    for room, folder in ROOMS.items():
        for module, files in third_party(ROOT / folder).items():
            name = IMPORT_NAMES.get(module, module).lower()
            used.add(name)
            if name == "onnxruntime":
                assert declared["cpu"] == {"onnxruntime"} and declared["gpu"] == {"onnxruntime-gpu"}
                assert room != "formats" and room != "prompt_bank", f"{room} imports onnxruntime ({sorted(files)})"
                continue
            if (room, name) in OPTIONAL:
                continue
            assert name in gives[room], f"{sorted(files)} import {module}; declare it for {room}"
    for module in third_party(ROOT / "tests"):
        used.add(IMPORT_NAMES.get(module, module).lower())
    never = set().union(*declared.values()) - used - LOADED_BY_TRANSFORMERS - TOOLS - {"onnxruntime-gpu", "softprompt-onnx"}
    assert not never, f"declared but imported by no code: {sorted(never)}"


def module_imports(folder: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same room it imports (at any level of the file; the package's __init__ aside)."""
    graph: dict[str, set[str]] = {}
    room = folder.name
    for path in folder.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(f"softprompt.{room}."):
                found.add(node.module.split(".")[2])
        graph[path.stem] = found - {path.stem, "__init__"}
    graph.pop("__init__", None)  # it re-exports the room's entry points
    return graph


def test_modules_within_a_room_import_each_other_one_way():
    """A cycle between two modules of a room (an import tucked into a function included) is a contract that belongs
    in a module below both."""
    for folder in ROOMS.values():
        graph = module_imports(ROOT / folder)
        for module in sorted(graph):
            follow(graph, (module,), folder)


def follow(graph: dict[str, set[str]], path: tuple[str, ...], folder: str) -> None:
    for target in sorted(graph.get(path[-1], ())):
        assert target not in path, f"{folder}: import cycle {' -> '.join((*path, target))}"
        follow(graph, (*path, target), folder)
