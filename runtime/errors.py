"""Errors of the runtime: one sentence each, raised with the value found and what was expected."""


class SoftpromptRuntimeError(Exception):
    """Base of the runtime's errors; the CLI prints these as one `error:` line."""


class ExportFormatError(SoftpromptRuntimeError):
    """An export folder is missing a file or its `softprompt.json` is not what this runtime reads."""


class ProviderError(SoftpromptRuntimeError):
    """An execution provider was asked for that this onnxruntime build does not have."""


class RequestError(SoftpromptRuntimeError, ValueError):
    """A request cannot run as given (too long for the model, bad sampling values, no bank)."""


class InferenceError(SoftpromptRuntimeError):
    """onnxruntime failed on a request; the message gives the shapes that were fed."""
