"""One call of a KV-cached decoder graph, on the CPU or on CUDA, and the past it starts from.

The present keys/values stay onnxruntime values and go back in as the next step's past as they
are, instead of being copied into numpy arrays and back every step. On the CPU they travel
through `run_with_ort_values` (one call); with CUDA through I/O binding, which is what keeps them
on the GPU. A graph whose cache may be shared (softprompt.json's `kv_cache`: GroupQueryAttention) is
stepped on the CPU with its past and present bound to the same buffers (`bind_cache`, `step_bound`,
kept by shared_cache.py), which the op writes in place: no copy of the cache at any step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from softprompt.formats.export_folder import ExportConfig

from .errors import InferenceError


class DecoderGraph:
    """`forward(inputs_embeds, attention_mask, position_ids, past) -> (logits, present)` over one session."""

    def __init__(self, session, config: ExportConfig):
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self._feeds_positions = "position_ids" in inputs
        self._keeps_logits = "logits_to_keep" in inputs  # built graphs: logits of the last position only
        self.past_names = config.past_names
        self.output_names = ["logits", *config.present_names]
        # Per-layer cache shape [heads, head size], read from the graph so unusual layouts still work.
        self._past_shapes = [tuple(inputs[name].shape[1::2]) for name in self.past_names]
        width = session.get_outputs()[0].shape[-1]  # the logits' (a built graph names it; a traced one may not)
        self.vocab_size = width if isinstance(width, int) else config.vocab_size
        # Where present keys/values live between steps: on the GPU when the session runs there.
        self.cache_device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
        self.binds = self.cache_device != "cpu"  # I/O binding: what keeps the cache on the GPU
        # One buffer for past and present, written in place (CPU only: the buffers are numpy arrays).
        self.shares_cache = config.kv_cache == "shared" and self.cache_device == "cpu"

    def forward(
        self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Sequence, all_logits: bool = False
    ) -> tuple[np.ndarray, list]:
        """One graph call; the last position's logits [B, V] (all of them, [B, T, V], with `all_logits`) and
        the present. `past` holds numpy arrays or the values an earlier call returned."""
        feeds = self._feeds(embeds, mask, positions, keep=0 if all_logits else 1)
        try:
            outputs = self._run_bound(feeds, past) if self.binds else self._run_values(feeds, past)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise _failed(feeds, exc) from exc
        logits, *present = outputs
        logits = logits.numpy()
        return (logits if all_logits else logits[:, -1]), present

    def bind_cache(self, buffers: Sequence[np.ndarray], logits: np.ndarray):
        """An I/O binding whose past and present are `buffers` (arrays [B, heads, capacity, size], one per cache
        input) and whose logits go to `logits` [B, 1, V]: GroupQueryAttention compares the pointers and writes each
        step's keys and values in place, and no output is allocated or wrapped (get_outputs() wrapped all 61 of the
        default model's outputs every step: 0.17 ms, 2% of an int8 step)."""
        from onnxruntime import OrtValue  # (imported with the session's first use: session.py says why)

        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        for past, present, buffer in zip(self.past_names, self.output_names[1:], buffers):
            value = OrtValue.ortvalue_from_numpy(buffer)  # the array's own memory
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def step_bound(self, binding, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> None:
        """One call through a `bind_cache` binding whose buffers have room for the mask's width: the last position's
        logits land in its logits array, the keys and values in its buffers."""
        feeds = self._feeds(embeds, mask, positions, keep=1)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise _failed(feeds, exc, " (the cache in place)") from exc

    def _feeds(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, keep: int) -> dict[str, np.ndarray]:
        """The inputs besides the past: position ids where the graph takes them, and the logits of the last `keep`
        positions (0: all) where it can keep fewer."""
        feeds = {"inputs_embeds": embeds, "attention_mask": mask}
        if self._feeds_positions:
            feeds["position_ids"] = positions
        if self._keeps_logits:
            feeds["logits_to_keep"] = np.array([keep], np.int64)
        return feeds

    def empty_past(self, batch: int, length: int = 0) -> list[np.ndarray]:
        return [np.zeros((batch, heads, length, size), dtype=np.float32) for heads, size in self._past_shapes]

    def _run_values(self, feeds: dict[str, np.ndarray], past: Sequence) -> list:
        values = {name: ort_value(value) for name, value in feeds.items()}
        values.update((name, ort_value(value)) for name, value in zip(self.past_names, past))
        return self.session.run_with_ort_values(self.output_names, values)

    def _run_bound(self, feeds: dict[str, np.ndarray], past: Sequence) -> list:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self.cache_device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()


def _failed(feeds: dict[str, np.ndarray], exc: Exception, how: str = "") -> InferenceError:
    shapes = {name: tuple(value.shape) for name, value in feeds.items()}
    return InferenceError(f"onnxruntime failed with inputs {shapes}{how}: {exc}")


def ort_value(value):
    """An onnxruntime value for a numpy array (sharing its memory), or the value itself."""
    from onnxruntime import OrtValue

    return OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value


def numpy_value(value) -> np.ndarray:
    """A numpy array for an onnxruntime value a graph call returned (on the CPU, its memory), or the array itself."""
    return value if isinstance(value, np.ndarray) else value.numpy()
