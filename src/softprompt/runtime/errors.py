"""Errors of the runtime: one sentence each, raised with the value found and what was expected.

An export folder or a bank file that cannot be read raises the formats' own errors
(`ExportFormatError`, `PromptBankError`); everything shares the base `SoftpromptError`.
"""

from softprompt.formats.errors import ExportFormatError, SoftpromptError

__all__ = ["ExportFormatError", "InferenceError", "ProviderError", "RequestError", "RequestTypeError", "SoftpromptRuntimeError"]


class SoftpromptRuntimeError(SoftpromptError):
    """Base of the runtime's own errors."""


class ProviderError(SoftpromptRuntimeError):
    """An execution provider was asked for that this onnxruntime build does not have."""


class RequestError(SoftpromptRuntimeError, ValueError):
    """A request cannot run as given (too long for the model, bad sampling values, no bank)."""


class RequestTypeError(RequestError, TypeError):
    """A request's value has the wrong type (a number where text goes, text where a count goes)."""


class InferenceError(SoftpromptRuntimeError):
    """onnxruntime failed on a request; the message gives the shapes that were fed."""
