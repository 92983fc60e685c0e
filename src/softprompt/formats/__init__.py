"""softprompt.formats: the two file formats every other part reads or writes (numpy and tokenizers only).

- The export folder (`export_folder`): `softprompt.json`, the graphs' cache names, the embedding
  table and tokenizer beside them, and the backbone fingerprint that ties prompts to a model.
- The prompt bank (`bank`, `task`): a task is `NAME.json` (its record, template and labels) naming
  `NAME.<hash>.npy` (its [P, E] soft prompt); a task changes as one unit.

Nothing here imports another part of softprompt: the exporter, the runtime, the bank tools and
training all import this.
"""

from .bank import Prompt, PromptMeta, list_tasks, load_bank, load_prompt, remove_prompt, save_prompt
from .errors import (
    BackboneMismatchError,
    ExportFormatError,
    InvalidPromptError,
    PromptBankError,
    SoftpromptError,
    UnknownTaskError,
)
from .export_folder import ExportConfig, ExportFolder, open_export, read_config
from .fingerprint import backbone_fingerprint
from .task import TaskSpec


def __getattr__(name: str) -> str:
    """`__version__`, read from the installed package's metadata only when asked for: importlib.metadata (email,
    zipfile, csv, inspect...) holds about 4 MB that an app embedding the runtime never uses."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("softprompt-onnx")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


__all__ = [
    "BackboneMismatchError",
    "ExportConfig",
    "ExportFolder",
    "ExportFormatError",
    "InvalidPromptError",
    "Prompt",
    "PromptBankError",
    "PromptMeta",
    "SoftpromptError",
    "TaskSpec",
    "UnknownTaskError",
    "backbone_fingerprint",
    "list_tasks",
    "load_bank",
    "load_prompt",
    "open_export",
    "read_config",
    "remove_prompt",
    "save_prompt",
]
