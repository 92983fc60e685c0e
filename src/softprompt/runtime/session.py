"""onnxruntime session creation with strict provider handling.

Asking for a provider this build lacks is an error naming those it has; a CUDA request that
onnxruntime quietly served on the CPU is a warning, because the user would otherwise only notice
it as slowness.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from softprompt.formats.export_folder import SHARED_CACHE_ORT, ExportConfig

from .errors import ExportFormatError, ProviderError, RequestError

if TYPE_CHECKING:
    import onnxruntime as ort
# onnxruntime is imported where a session is made, not with the runtime: a model on onnxruntime-genai's loop
# (native_loop.py) may never need the Python module's own copy of onnxruntime (about 20 MB resident).

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# fp32 on CUDA means fp32: TF32 matrix products (onnxruntime's default on Ampere and later) round
# inputs to 10 bits and change greedy tokens against the CPU, and decoding at small batches reads
# weights rather than multiplies them, so TF32 would buy little there.
CUDA_OPTIONS = {"use_tf32": "0"}


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """`None` picks CUDA when this onnxruntime has it, else the CPU; names are checked, CPU is added last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        return [CUDA, CPU] if CUDA in available else [CPU]
    requested = [providers] if isinstance(providers, str) else list(providers)
    aliases = {"cpu": CPU, "cuda": CUDA}
    requested = [aliases.get(name.lower(), name) for name in requested]
    missing = [name for name in requested if name not in available]
    if missing:
        raise ProviderError(
            f"execution provider(s) {missing} not available in this onnxruntime; available: {available}"
            + (" (CUDA needs the 'gpu' extra: pip install 'softprompt-onnx[gpu]')" if CUDA in missing else "")
        )
    if not requested:
        raise ProviderError(f"no execution provider given; available: {available}")
    return requested if CPU in requested else [*requested, CPU]


def check_onnxruntime(config: ExportConfig, version: str | None = None) -> None:
    """A shared-cache export names an input of GroupQueryAttention that older onnxruntimes do not have, and they
    would refuse the graph with a schema error that does not say what to do: say it before loading."""
    if version is None:
        import onnxruntime as ort

        version = ort.__version__
    found = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if config.kv_cache == "shared" and found < SHARED_CACHE_ORT:
        needed = ".".join(map(str, SHARED_CACHE_ORT))
        raise ExportFormatError(
            f"this export's attention (export-model --kv-cache shared, the default) needs onnxruntime {needed} or later; "
            f"this is onnxruntime {version}: upgrade it (pip install 'onnxruntime>={needed}'), or export the model "
            "again with --kv-cache growing"
        )


def create_session(
    model_path: Path, providers: list[str], threads: int | None = None, fold_weights: bool = False
) -> ort.InferenceSession:
    """Create the session with full graph optimisation; warn when CUDA was asked for but did not stick.

    `fold_weights`: a graph whose quantized weights are DequantizeLinear + MatMul (`export-model --web`) gets them
    folded into float weights once, instead of dequantized at every call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if fold_weights:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads is None and os.environ.get("SOFTPROMPT_THREADS"):
        value = os.environ["SOFTPROMPT_THREADS"]
        if not value.strip().isdigit() or int(value) < 1:
            raise RequestError(f"SOFTPROMPT_THREADS={value!r}; expected a positive whole number of threads")
        threads = int(value)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise RequestError(f"threads {threads!r}; expected a positive whole number (or None: onnxruntime's choice)")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's warnings about unused initializers are noise here
    with_options = [(name, CUDA_OPTIONS) if name == CUDA else name for name in providers]
    try:
        session = ort.InferenceSession(str(model_path), options, providers=with_options)
    except Exception as exc:  # onnxruntime's own types (InvalidProtobuf, Fail, ...): a damaged or foreign graph
        reason = " ".join(str(exc).split())
        raise ExportFormatError(f"{model_path}: onnxruntime cannot load this graph ({reason}); re-export the model") from None
    if CUDA in providers and CUDA not in session.get_providers():
        warnings.warn(
            f"CUDAExecutionProvider was requested but the session runs on {session.get_providers()}; "
            "check the CUDA and cuDNN libraries that onnxruntime-gpu needs",
            RuntimeWarning,
            stacklevel=3,
        )
    return_freed_memory()
    return session


def return_freed_memory() -> None:
    """Give the memory a session's creation freed back to the system. onnxruntime reads each weight, packs a copy for
    its kernels and frees what it read; glibc keeps those freed pages inside its heap (they sit below live blocks,
    where its own trimming never reaches), and malloc_trim returns them: about 4 MB for the default int4 model,
    resident for the whole life of a process that loaded it. Elsewhere than glibc there is nothing to call."""
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; musl has none
        if trim is not None:
            trim(0)


def warn_if_slow(config: ExportConfig, session: ort.InferenceSession) -> None:
    """An fp16 export on the CPU runs, but onnxruntime's CPU kernels for fp16 are slow; an export whose attention
    shares its cache (GroupQueryAttention) at fp32 runs its attention on the CPU under CUDA, whose kernel is fp16
    only: say which export to use."""
    on_cuda = CUDA in session.get_providers()
    if on_cuda and config.precision != "fp16" and config.kv_cache == "shared":
        warnings.warn(
            "this export's attention is GroupQueryAttention in fp32, which onnxruntime's CUDA provider runs on the CPU "
            "(its CUDA kernel is fp16 only): for CUDA export with --kv-cache growing (or --precision fp16)",
            RuntimeWarning,
            stacklevel=3,
        )
    if config.precision == "fp16" and not on_cuda:
        warnings.warn(
            "this export is fp16, which is for CUDA; on the CPU provider it runs slower than fp32. "
            "For CPUs export with --precision int8 (or int4)",
            RuntimeWarning,
            stacklevel=3,
        )
