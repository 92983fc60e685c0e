"""The OpenAI-compatible HTTP app (Starlette): a loaded export (or several), its bank's tasks as models, an engine each.

Model ids: the backbone's name (no task) and `NAME:TASK` for every task of the bank, read again
for every request, so a task swapped into the bank folder is served from the next request. A
request for `NAME:TASK` gives what `run-model --task TASK` gives for the same input and settings:
the task's template is applied to the prompt (chat: to the last user message) and its soft prompt
or prefix leads it. Settings absent from a request take the runtime's defaults (greedy).

Errors are OpenAI's error objects (`{"error": {"message", "type", "param", "code"}}`) with 400
(a bad request), 401 (a missing or wrong key), 404 (an unknown model or route), 413 (a body too
large), 429/503 with `Retry-After` (too many waiting requests, shutting down); never a traceback.
The request and response bodies are protocol.py's; each endpoint is one function (generation.py,
routes.py) of the `Served` state they share.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from softprompt.formats.errors import SoftpromptError, UnknownTaskError
from softprompt.runtime import start_engine

from . import routes
from .generation import chat_completions, completions
from .metrics import Metrics
from .protocol import ApiError, Limits, error_response
from .served import Served, log, pick


def create_app(model, *, name: str | None = None, api_key: str | None = None, limits: Limits | None = None) -> Starlette:
    """The app serving `model` (a loaded export) as `name` and `name:TASK`; or several exports, `model` a mapping of
    their names to them (each its own engine: a request goes to the export its model id names)."""
    limits = limits or Limits()
    if isinstance(model, Mapping):
        models = dict(model)
    elif name is None:
        raise ValueError("create_app: name the model (name=...), or give a mapping of names to models")
    else:
        models = {name: model}
    if not models or any(not n or ":" in n for n in models):
        raise ValueError(f"create_app: model names {sorted(models)}; expected at least one, each non-empty, without ':'")
    metrics = Metrics()  # one server's counters, whichever export answered
    served = [
        Served(one, n, api_key, limits, start_engine(one, limits.max_batch, limits.max_queue), metrics)
        for n, one in models.items()
    ]
    for one in served:
        one.beside = served

    def route(path: str, endpoint, method: str, logged: bool = True) -> Route:
        if method == "POST":  # the body's model id picks the export
            handler = functools.partial(by_model_id, served, endpoint)
        else:
            handler = functools.partial(endpoint, served)
        return Route(path, guarded(served[0], handler) if logged else handler, methods=[method])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for one in served:
            one.closing = True
        for one in served:
            if one.engine is not None:
                await run_in_threadpool(one.engine.close, 60.0)

    app = Starlette(
        routes=[
            route("/v1/completions", completions, "POST"),
            route("/v1/chat/completions", chat_completions, "POST"),
            route("/v1/embeddings", routes.embeddings, "POST"),
            route("/v1/classify", routes.classify, "POST"),
            route("/v1/models", routes.models, "GET"),
            route("/v1/models/{model_id:path}", routes.one_model, "GET"),
            route("/health", routes.health, "GET", logged=False),
            route("/metrics", routes.metrics, "GET", logged=False),
        ],
        lifespan=lifespan,
        exception_handlers={
            404: functools.partial(routes.not_found, served[0]),
            405: functools.partial(routes.not_found, served[0]),
        },
    )
    app.state.engine = served[0].engine
    app.state.engines = {one.name: one.engine for one in served}
    return app


async def by_model_id(served: list[Served], endpoint, request: Request) -> Response:
    """A POST answered by the export its body's model id names."""
    body = await served[0].body(request)
    return await endpoint(pick(served, body.get("model")), request)


def guarded(served: Served, handler):
    """The endpoint's errors as OpenAI error objects, and a log line a request (a stream logs at its end)."""

    async def run(request: Request) -> Response:
        started = time.perf_counter()
        response = await answer(served, handler, request)
        if not getattr(request.state, "streaming", False) or response.status_code != 200:
            served.access(request, response.status_code, started, getattr(request.state, "tokens", None))
        return response

    return run


async def answer(served: Served, handler, request: Request) -> Response:
    try:
        return await handler(request)
    except ApiError as exc:
        served.metrics.error(exc.status)
        return error_response(exc)
    except UnknownTaskError as exc:  # a task removed from the bank between the lookup and the run
        served.metrics.error(404)
        return error_response(ApiError(404, str(exc), param="model", code="model_not_found"))
    except SoftpromptError as exc:
        served.metrics.error(400)
        return error_response(ApiError(400, str(exc)))
    except Exception:  # never a traceback to the client; the server's log has it
        log.exception("request failed")
        served.metrics.error(500)
        return error_response(ApiError(500, "the server failed on this request", kind="server_error"))
