"""Errors of the bank tools beyond the format's own (those live in softprompt.formats.errors)."""

from softprompt.formats.errors import PromptBankError


class AdapterError(PromptBankError):
    """A PEFT adapter folder is not a prompt-tuning adapter this project can read."""
