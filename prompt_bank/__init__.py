"""softprompt.prompt_bank: the soft-prompt bank format (numpy only), its checks, and PEFT conversion.

>>> from softprompt.prompt_bank import save_prompt, load_prompt   # doctest: +SKIP
"""

from .errors import AdapterError, BackboneMismatchError, InvalidPromptError, PromptBankError, UnknownTaskError
from .fingerprint import backbone_fingerprint
from .format import Prompt, PromptMeta, list_tasks, load_bank, load_prompt, remove_prompt, save_prompt
from .peft import read_peft_adapter

__all__ = [
    "AdapterError",
    "BackboneMismatchError",
    "InvalidPromptError",
    "Prompt",
    "PromptBankError",
    "PromptMeta",
    "UnknownTaskError",
    "backbone_fingerprint",
    "list_tasks",
    "load_bank",
    "load_prompt",
    "read_peft_adapter",
    "remove_prompt",
    "save_prompt",
]
