"""softprompt.runtime: run a frozen ONNX backbone with task soft prompts (numpy, onnxruntime, tokenizers only).

>>> from softprompt.runtime import load                                   # doctest: +SKIP
>>> model = load("exports/smollm2-int4", bank="banks/smollm2-135m")      # doctest: +SKIP
>>> model.generate("Committee, n.", task="define", max_new_tokens=32)   # the task applies its template  # doctest: +SKIP
"""

from softprompt.formats.export_folder import ExportConfig, read_config

from .batch_file import MODES as BATCH_MODES
from .batch_file import check_row, run_batch, run_file
from .encoder import Encoder
from .engine import Engine, Job, QueueFull, start_engine
from .errors import ExportFormatError, InferenceError, ProviderError, RequestError, SoftpromptRuntimeError
from .generate import Completion
from .model import Model, load
from .options import add_generation_options, check_row_options, generation_settings
from .seq2seq import Seq2Seq
from .settings import GenerationSettings
from .tasks import Task

__all__ = [
    "BATCH_MODES",
    "Completion",
    "Encoder",
    "Engine",
    "ExportConfig",
    "ExportFormatError",
    "GenerationSettings",
    "InferenceError",
    "Job",
    "Model",
    "ProviderError",
    "QueueFull",
    "RequestError",
    "Seq2Seq",
    "SoftpromptRuntimeError",
    "Task",
    "add_generation_options",
    "check_row_options",
    "check_row",
    "generation_settings",
    "load",
    "read_config",
    "run_batch",
    "run_file",
    "start_engine",
]
