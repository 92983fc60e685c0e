"""Errors of the exporter; the CLI prints them as one `error:` line."""


class ExportError(Exception):
    """The model cannot be exported as asked (unknown source, unsupported architecture, existing output)."""


class ExportValidationError(ExportError):
    """The ONNX graph does not reproduce PyTorch; the message lists every mismatch found."""
