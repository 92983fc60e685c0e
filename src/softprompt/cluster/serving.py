"""Ray Serve: `serve-model`'s app on N replicas, each loading the export once and following the bank folder.

Every replica runs the same Starlette app as `serve-model` (`softprompt.server.create_app`), with
its own continuous-batching engine; Ray's proxy spreads requests over the replicas and queues what
they cannot take. A replica takes up to `max_batch` requests at once (one full batch), so requests
wait in Ray's queue rather than pile onto one replica, and `max_queue` more wait there before Ray
answers 503. Tasks swapped into the bank folder are served by every replica from its next request,
as in one process: the folder must be the same one (a shared file system) or kept the same on every
node.
"""

from __future__ import annotations

from pathlib import Path

from ray import serve
from ray.serve import Application

from softprompt.runtime import load
from softprompt.server import Limits, create_app


class Replica:
    """One loaded export behind the OpenAI API."""

    def __init__(
        self,
        export_dir: str,
        bank: str | None,
        name: str,
        api_key: str | None,
        limits: Limits,
        providers: list[str] | None,
        threads: int | None,
    ):
        model = load(export_dir, bank=bank, providers=providers, threads=threads)
        self._app = create_app(model, name=name, api_key=api_key, limits=limits)

    def __serve_build_asgi_app__(self):
        return self._app


# Ray builds the ASGI app after the constructor has loaded the model (an ingress without an app given).
DEPLOYMENT = serve.deployment(name="softprompt")(serve.ingress()(Replica))


def application(
    export_dir: str | Path,
    *,
    bank: str | Path | None = None,
    name: str | None = None,
    replicas: int = 1,
    cpus_per_replica: float = 1,
    api_key: str | None = None,
    limits: Limits | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
) -> Application:
    """A Ray Serve application of the export and its bank (`serve.run(application(...))`); paths are made absolute
    here, so they must name the same folders on every node. Each replica asks Ray for `cpus_per_replica` CPUs and
    gives onnxruntime as many threads unless `threads` says otherwise."""
    if replicas < 1 or cpus_per_replica <= 0:
        raise ValueError(f"replicas {replicas}, cpus_per_replica {cpus_per_replica}; expected at least 1 and > 0")
    export = Path(export_dir).resolve()
    limits = limits or Limits()
    deployment = DEPLOYMENT.options(
        num_replicas=replicas,
        max_ongoing_requests=limits.max_batch,
        max_queued_requests=limits.max_queue,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    return deployment.bind(
        str(export),
        None if bank is None else str(Path(bank).resolve()),
        name or export.name,
        api_key,
        limits,
        providers,
        threads or max(1, int(cpus_per_replica)),
    )
