"""Errors of the exporter; the CLI prints them as one `error:` line."""

from softprompt.formats.errors import SoftpromptError


class ExportError(SoftpromptError):
    """The model cannot be exported as asked (unknown source, unsupported architecture, existing output)."""


class ExportValidationError(ExportError):
    """The ONNX graph does not reproduce PyTorch; the message lists every mismatch found."""
