"""Errors of the two file formats: one sentence each, raised with the file, the value found and what was expected."""


class SoftpromptError(Exception):
    """Base of every error this project raises on purpose; the CLIs print these as one `error:` line."""


class ExportFormatError(SoftpromptError):
    """An export folder is missing a file or its `softprompt.json` is not what this version reads."""


class PromptBankError(SoftpromptError, ValueError):
    """A bank or one of its task files cannot be used as it is."""


class InvalidPromptError(PromptBankError):
    """A task's `.npy` or `.json` file is malformed, corrupt or inconsistent."""


class BackboneMismatchError(PromptBankError):
    """A prompt was made for another backbone (other width or fingerprint) than the one asked for."""


class UnknownTaskError(PromptBankError, KeyError):
    """The task asked for is not in the bank; the message lists those that are."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def unexpected(exc: BaseException) -> str:
    """The one `error:` line a CLI prints for an exception it did not expect (SOFTPROMPT_DEBUG=1 re-raises it)."""
    reason = " ".join(str(exc).split())
    return f"error: unexpected {type(exc).__name__}: {reason} (SOFTPROMPT_DEBUG=1 shows the traceback; please report it)"
