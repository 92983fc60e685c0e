"""Errors raised by the prompt-bank format: each names the file, the value and what was expected."""


class PromptBankError(ValueError):
    """A bank or one of its task files cannot be used as it is."""


class InvalidPromptError(PromptBankError):
    """A task's `.npy` or `.json` file is malformed, corrupt or inconsistent."""


class BackboneMismatchError(PromptBankError):
    """A prompt was made for another backbone (other width or fingerprint) than the one asked for."""


class UnknownTaskError(PromptBankError, KeyError):
    """The task asked for is not in the bank; the message lists those that are."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterError(PromptBankError):
    """A PEFT adapter folder is not a prompt-tuning adapter this project can read."""
