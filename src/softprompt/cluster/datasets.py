"""Ray Data: classify, generate, chat or embed a whole dataset, one loaded model per worker.

Each worker is a Ray actor that loads the export once and then runs batch after batch with the
runtime's mixed-task batching (rows of different tasks share a batch), exactly as
`run-model --input` runs a file: the same row checks, the same results (`runtime/batch_file.py`).

Columns in, columns out: every input column is kept, and the result's columns are added (`task`;
`output`, `token_ids`, `finish_reason`; or `label`, `scores`; or `embedding`), with one schema for
every batch so Parquet files of one run agree: `scores` is a map from label to probability,
`embedding` a list of float32. A null is an absent field (columnar files cannot tell them apart):
a row whose `task` is null runs under the default task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink

from softprompt.formats.errors import SoftpromptError
from softprompt.formats.export_folder import read_config
from softprompt.runtime import BATCH_MODES, check_row, load, run_batch

# The result columns' types, fixed so that every batch (of any tasks) writes the same schema.
RESULT_TYPES = {
    "task": pa.string(),
    "output": pa.string(),
    "token_ids": pa.list_(pa.int64()),
    "finish_reason": pa.string(),
    "label": pa.string(),
    "scores": pa.map_(pa.string(), pa.float64()),
    "embedding": pa.list_(pa.float32()),
}
FORMATS = ("jsonl", "parquet")


def choose_mode(export_dir: str | Path, mode: str | None) -> str:
    """The mode a run takes on this export (None: generate on text models, embed on encoders), checked before any
    worker starts so a wrong choice is one error rather than one per worker."""
    kind = read_config(export_dir).kind
    if mode is None:
        return "embed" if kind == "encoder" else "generate"
    if mode not in BATCH_MODES:
        raise SoftpromptError(f"mode {mode!r}; expected one of {', '.join(BATCH_MODES)}")
    if kind == "encoder" and mode in ("generate", "chat"):
        raise SoftpromptError(
            f"{export_dir} is an encoder export: it embeds or classifies texts; mode {mode!r} needs a text model"
        )
    if kind != "encoder" and mode == "embed":
        raise SoftpromptError(f"{export_dir} is a {kind} export: embeddings come from encoder exports")
    return mode


class Worker:
    """A Ray Data actor: one loaded model, reused for every batch it is given."""

    def __init__(
        self,
        export_dir: str,
        bank: str | None,
        mode: str,
        task: str | None,
        settings: dict[str, Any],
        system: str | None,
        providers: list[str] | None,
        threads: int | None,
    ):
        self.model = load(export_dir, bank=bank, providers=providers, threads=threads)
        self.mode, self.task, self.settings, self.system = mode, task, settings, system

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [_present(row) for row in batch.to_pylist()]
        for row in rows:
            check_row(row, self.mode, "input row")
        results = run_batch(self.model, rows, self.mode, self.task, self.settings, self.system)
        return _with_results(batch, results)


def _present(value: Any) -> Any:
    """A row with its nulls removed, at every depth (a chat message's missing `name` is null in Arrow)."""
    if isinstance(value, dict):
        return {key: _present(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_present(item) for item in value]
    return value


def _with_results(batch: pa.Table, results: list[dict]) -> pa.Table:
    """The input columns, then the results' (a result column replaces an input column of the same name)."""
    names = list(results[0]) if results else []
    columns = {name: batch.column(name) for name in batch.column_names if name not in names}
    for name in names:
        values = [result.get(name) for result in results]
        if name == "scores":
            values = [None if v is None else list(v.items()) for v in values]
        columns[name] = pa.array(values, RESULT_TYPES.get(name))
    return pa.table(columns)


def map_dataset(
    dataset: ray.data.Dataset,
    export_dir: str | Path,
    *,
    bank: str | Path | None = None,
    mode: str | None = None,
    task: str | None = None,
    settings: dict[str, Any] | None = None,
    system: str | None = None,
    workers: int = 1,
    cpus_per_worker: float = 1,
    batch_size: int = 16,
    providers: list[str] | None = None,
) -> ray.data.Dataset:
    """`dataset` with each row's result added, computed by `workers` actors that each load the export once.

    The export and bank paths must name the same folders on every node of the cluster (a shared file
    system, or copies at the same path). Each worker asks Ray for `cpus_per_worker` CPUs and gives
    onnxruntime as many threads. Rows come back in input order only when the Ray Data context says
    `execution_options.preserve_order = True` (`cluster-model run` sets it).
    """
    if workers < 1 or batch_size < 1 or cpus_per_worker <= 0:
        raise SoftpromptError(
            f"workers {workers}, batch_size {batch_size}, cpus_per_worker {cpus_per_worker}; expected at least 1, 1 and > 0"
        )
    mode = choose_mode(export_dir, mode)
    threads = max(1, int(cpus_per_worker))
    arguments = dict(
        export_dir=str(Path(export_dir).resolve()),
        bank=None if bank is None else str(Path(bank).resolve()),
        mode=mode,
        task=task,
        settings=settings if mode in ("generate", "chat") else {},
        system=system,
        providers=providers,
        threads=threads,
    )
    return dataset.map_batches(
        Worker,
        fn_constructor_kwargs=arguments,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
    )


def is_uri(path: str | Path) -> bool:
    """s3://, gs://, ...: a location Ray Data reads and writes itself, which this machine cannot list."""
    return "://" in str(path)


def format_of(path: str | Path, given: str | None = None) -> str:
    """jsonl or parquet: `given`, or what the file's (or a local folder's files') extension says."""
    if given is not None:
        if given not in FORMATS:
            raise SoftpromptError(f"format {given!r}; expected one of {', '.join(FORMATS)}")
        return given
    local = not is_uri(path) and Path(path).is_dir()
    names = [p.name for p in Path(path).iterdir() if p.is_file()] if local else [str(path).rstrip("/")]
    found = {"parquet" if n.endswith(".parquet") else "jsonl" for n in names if n.endswith((".parquet", ".jsonl", ".json"))}
    if len(found) != 1:
        if local:
            what = "a folder with no .jsonl or .parquet files" if not found else "a folder with both .jsonl and .parquet files"
        else:
            what = f"a {Path(names[0]).suffix or 'file without an extension'}"
        raise SoftpromptError(f"{path} is {what}; expected .jsonl or .parquet (or say which with --input-format)")
    return found.pop()


def input_format(path: str | Path, format: str | None = None) -> str:
    """The format of an input that exists (a URI is Ray Data's to find), checked before Ray starts."""
    if not is_uri(path) and not Path(path).exists():
        raise SoftpromptError(f"{path} does not exist; expected a .jsonl or .parquet file, or a folder of them")
    return format_of(path, format)


def read_inputs(path: str | Path, format: str | None = None) -> ray.data.Dataset:
    """A JSONL or Parquet file, or a folder of them (local, or a URI Ray Data reads), as a dataset."""
    if input_format(path, format) == "parquet":
        return ray.data.read_parquet(str(path))
    return ray.data.read_json(str(path), file_extensions=["jsonl", "json"])  # Arrow's reader: one row a line, nulls kept


class JsonLinesDatasink(BlockBasedFileDatasink):
    """Rows as JSON lines, written as `run-model --output` writes them (Ray's own JSON writer goes through pandas,
    which cannot write list-of-struct columns such as chat messages)."""

    def __init__(self, path: str):
        super().__init__(path, file_format="jsonl")

    def write_block_to_file(self, block: BlockAccessor, file: pa.NativeFile) -> None:
        rows = block.to_arrow().to_pylist(maps_as_pydicts="strict")
        file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())


class ParquetBlocksDatasink(BlockBasedFileDatasink):
    """Each block as one Parquet file, its rows in order. Ray's own Parquet writer hands a task's blocks to pyarrow's
    multi-threaded `write_dataset`, which may write them in any order within the file (apache/arrow#26818): a run
    came out as rows 0, 1, 2, 6, 7, 3, 4, 5."""

    def __init__(self, path: str):
        super().__init__(path, file_format="parquet")

    def write_block_to_file(self, block: BlockAccessor, file: pa.NativeFile) -> None:
        pq.write_table(block.to_arrow(), file)


def write_outputs(dataset: ray.data.Dataset, path: str | Path, format: str) -> None:
    """A folder of JSONL or Parquet files (Ray writes one file per block); sorted by name they hold the rows in order."""
    if format not in FORMATS:
        raise SoftpromptError(f"format {format!r}; expected one of {', '.join(FORMATS)}")
    if format == "parquet":
        dataset.write_datasink(ParquetBlocksDatasink(str(path)))
    else:
        dataset.write_datasink(JsonLinesDatasink(str(path)))
