"""softprompt.runtime: run a frozen ONNX backbone with task soft prompts (numpy, onnxruntime, tokenizers only).

>>> from softprompt.runtime import load                                   # doctest: +SKIP
>>> model = load("exports/smollm2-int4", bank="banks/smollm2-135m")      # doctest: +SKIP
>>> model.generate("Committee, n.", task="define", max_new_tokens=32)   # the task applies its template  # doctest: +SKIP
"""

from softprompt.formats.export_folder import ExportConfig, read_config

from .encoder import Encoder
from .errors import ExportFormatError, InferenceError, ProviderError, RequestError, SoftpromptRuntimeError
from .generate import Completion
from .model import Model, load
from .seq2seq import Seq2Seq
from .settings import GenerationSettings

__all__ = [
    "Completion",
    "Encoder",
    "ExportConfig",
    "ExportFormatError",
    "GenerationSettings",
    "InferenceError",
    "Model",
    "ProviderError",
    "RequestError",
    "Seq2Seq",
    "SoftpromptRuntimeError",
    "load",
    "read_config",
]
