"""Decoding on onnxruntime-genai's native loop (`load(..., loop="genai")`, the `genai` extra).

onnxruntime-genai runs the decode loop in C++: the graph call, the cache in one buffer, the greedy
choice. The runtime's own loop spends 0.2-0.3 ms of Python around each call, 2-5% of a small
quantized model's step on two cores, which is what separated the default model's same-recipe
decode from genai's (docs/BENCHMARKS.md). It steps `model.genai.onnx`, which export-model writes
beside model.onnx: the same decoder behind ids, where an id V + i (V the vocabulary) is row i of the
`soft_prompts` input, so a prompt task is its vectors set once and the ids V..V+P-1 before the text's.

It serves what it gives the same tokens for: one row, greedy, on the CPU, under no task or a
prompt task. Everything else (batches, sampling, prefix and P-tuning tasks) runs on the runtime's
loop, whose session is then created; a process that only ever asks for what this serves holds one
copy of the weights, and one onnxruntime library (the runtime imports onnxruntime's Python module, which
holds its own, only where it makes a session). It holds 4-15 MB more than the runtime's loop: onnxruntime-genai's
library (6 MB resident) and the pages of the table its graph maps, where the runtime reads rows from the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from softprompt.formats.export_folder import GENAI_CONFIG, ExportConfig

from .errors import ExportFormatError, ProviderError, RequestError
from .settings import GenerationSettings
from .tasks import Task

LOOPS = ("runtime", "genai")


class NativeLoop:
    """An onnxruntime-genai model over an export folder's genai layout; `generate` yields one row's greedy tokens."""

    def __init__(self, folder: Path, config: ExportConfig, threads: int | None):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise RequestError(
                "loop='genai' needs onnxruntime-genai: pip install 'softprompt-onnx[genai]' (or load with loop='runtime')"
            ) from None
        if not (folder / GENAI_CONFIG).is_file():
            raise ExportFormatError(
                f"{folder} has no {GENAI_CONFIG}: it was exported before export-model wrote onnxruntime-genai's layout; "
                'export it again, or add the layout: python -c "from softprompt.exporter.genai_layout import '
                f"write_genai_layout; write_genai_layout('{folder}')\""
            )
        described = og.Config(str(folder))
        described.clear_providers()  # the CPU: genai's CUDA loop would want the fp16 layout and its own cache
        if threads:
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            described.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self._og = og
        self._model = og.Model(described)
        self._no_task = np.zeros((1, config.hidden_size), np.float32)
        self._vocab = config.vocab_size

    @staticmethod
    def serves(ids: Sequence[Sequence[int]], found: Sequence[Task | None], settings: GenerationSettings) -> bool:
        """Whether these rows are what this loop gives the runtime's tokens for."""
        if len(ids) != 1 or settings.temperature != 0:
            return False
        task = found[0]
        if task is None:
            return len(ids[0]) > 0
        return task.past is None and not len(task.inner) and len(task.vectors) + len(ids[0]) > 0

    def generate(self, ids: Sequence[int], task: Task | None, settings: GenerationSettings) -> Iterator[int]:
        """The row's tokens, greedy, one at a time (it stops when the caller stops asking, or at max_new_tokens)."""
        og = self._og
        vectors = None if task is None or not len(task.vectors) else task.vectors
        first = [*range(self._vocab, self._vocab + (0 if vectors is None else len(vectors))), *map(int, ids)]
        params = og.GeneratorParams(self._model)
        total = len(first) + settings.max_new_tokens
        params.set_search_options(max_length=total, min_length=len(first) + settings.min_new_tokens, do_sample=False)
        generator = og.Generator(self._model, params)
        # genai reads the array where it is, when it runs the graph, and takes writable arrays only: a copy, which
        # this frame holds for as long as the generator runs
        rows = np.array(self._no_task if vectors is None else vectors, np.float32)
        generator.set_model_input("soft_prompts", rows)
        generator.append_tokens(np.array([first], np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])


def check_loop(loop: str, providers: Sequence[str] | str | None, kind: str) -> None:
    """Refuse a loop this load cannot have, saying what would work. The genai loop runs on the CPU: `providers` may
    be None (then the CPU, whatever else onnxruntime has) or name the CPU only."""
    if loop not in LOOPS:
        raise RequestError(f"loop {loop!r}; expected one of {', '.join(LOOPS)}")
    if loop == "genai" and kind != "decoder":
        raise RequestError(f"loop='genai' runs decoder exports; this export is a {kind}: load it with loop='runtime'")
    named = [providers] if isinstance(providers, str) else list(providers or ["cpu"])
    if loop == "genai" and {name.lower() for name in named} - {"cpu", "cpuexecutionprovider"}:
        raise ProviderError(f"loop='genai' runs on the CPU, not {named}: load it with providers='cpu' (or None)")
