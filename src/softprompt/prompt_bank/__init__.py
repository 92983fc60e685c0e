"""softprompt.prompt_bank: prompt banks for users (numpy only): the bank format's API, checking a bank
against an export, PEFT conversion, and the `prompt-bank` command.

The format itself lives in softprompt.formats (the runtime and training read and write it there);
its entry points are re-exported here because this is where users look for them.

>>> from softprompt.prompt_bank import save_prompt, load_prompt   # doctest: +SKIP
>>> from softprompt.prompt_bank import import_peft, export_peft    # doctest: +SKIP
"""

from softprompt.formats import (
    BackboneMismatchError,
    InvalidPromptError,
    Prompt,
    PromptBankError,
    PromptMeta,
    UnknownTaskError,
    backbone_fingerprint,
    list_tasks,
    load_bank,
    load_prompt,
    remove_prompt,
    save_prompt,
)

from .errors import AdapterError
from .peft import read_peft_adapter, write_peft_adapter
from .peft_tasks import ExportedAdapter, export_peft, import_peft

__all__ = [
    "AdapterError",
    "BackboneMismatchError",
    "ExportedAdapter",
    "InvalidPromptError",
    "Prompt",
    "PromptBankError",
    "PromptMeta",
    "UnknownTaskError",
    "backbone_fingerprint",
    "export_peft",
    "import_peft",
    "list_tasks",
    "load_bank",
    "load_prompt",
    "read_peft_adapter",
    "remove_prompt",
    "save_prompt",
    "write_peft_adapter",
]
