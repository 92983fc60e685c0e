"""softprompt.exporter: export a frozen backbone to ONNX once, with an `inputs_embeds` entry point.

Importing this package is cheap; torch and transformers load on first use of `export_model`.

>>> from softprompt.exporter import export_model          # doctest: +SKIP
>>> export_model("smollm2-135m", "exports/smollm2")         # doctest: +SKIP
"""

from .errors import ExportError, ExportValidationError

__all__ = ["ExportError", "ExportValidationError", "export_model"]


def __getattr__(name: str):
    if name == "export_model":
        from .export import export_model

        return export_model
    raise AttributeError(name)
