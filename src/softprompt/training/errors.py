"""Errors of training: the data, the settings or the model cannot be trained as given."""

from softprompt.formats.errors import PromptBankError


class TrainingError(PromptBankError):
    """Training cannot run as asked; the message names the option, file or value at fault."""
