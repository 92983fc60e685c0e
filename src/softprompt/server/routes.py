"""The other endpoints: embeddings and classify (encoder exports and classification tasks), the model list, one
model, health and metrics, and OpenAI-shaped answers for routes that do not exist."""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from softprompt.runtime import Encoder

from .protocol import ApiError, TextsRequest, embeddings_body, error_response, model_object
from .served import Served, now, pick


async def embeddings(served: Served, request: Request) -> Response:
    asked = TextsRequest.of(await served.body(request))
    model = served.model
    if not isinstance(model, Encoder):
        raise ApiError(400, f"{served.name} generates text; embeddings come from encoder exports", param="model")
    task = served.resolve(asked.model)
    request.state.model = asked.model
    width = model.config.hidden_size
    if asked.dimensions not in (None, width):  # no Matryoshka training here: a cut vector would be another
        raise ApiError(
            400, f"dimensions {asked.dimensions!r:.20}; this model's embeddings have {width} (the only value)", param="dimensions"
        )
    vectors = await run_in_threadpool(model.embed, asked.texts, task)
    tokens = sum(len(model.encode(text, task)) for text in asked.texts)
    return JSONResponse(embeddings_body(asked.model, vectors, asked.encoding_format, tokens))


async def classify(served: Served, request: Request) -> Response:
    asked = TextsRequest.of(await served.body(request))
    task = served.resolve(asked.model)
    request.state.model = asked.model
    if task is None:
        raise ApiError(400, f"classify needs a task's model id ({served.name}:TASK) whose task has labels", param="model")
    results = await run_in_threadpool(served.model.classify, asked.texts, task)
    return JSONResponse({"object": "list", "model": asked.model, "data": [{"index": i, **r} for i, r in enumerate(results)]})


async def models(served: list[Served], request: Request) -> Response:
    served[0].authorize(request)
    created = now()
    return JSONResponse({"object": "list", "data": [model_object(i, created) for i in served[0].server_ids()]})


async def one_model(served: list[Served], request: Request) -> Response:
    """GET /v1/models/{id} (the openai client's models.retrieve)."""
    served[0].authorize(request)
    name = request.path_params["model_id"]
    request.state.model = name
    pick(served, name).resolve(name)  # 404 with the known ids, or the reason a task of the bank is not served
    return JSONResponse(model_object(name, now()))


async def health(served: list[Served], request: Request) -> Response:
    return JSONResponse(
        {
            "status": "shutting down" if served[0].closing else "ok",
            "tasks": sum(len(one.model.tasks) for one in served),
            "models": {one.name: len(one.model.tasks) for one in served},
        }
    )


async def metrics(served: list[Served], request: Request) -> Response:
    engines = {one.name: one.engine for one in served}
    return PlainTextResponse(served[0].metrics.render(engines), media_type="text/plain; version=0.0.4")


async def not_found(served: Served, request: Request, exc: Exception) -> Response:
    """Unknown routes and methods as OpenAI error objects, not Starlette's plain text."""
    status = getattr(exc, "status_code", 404)
    what = "no route" if status == 404 else f"{request.method} is not allowed on"
    error = ApiError(status, f"{what} {request.url.path}; this server serves /v1/models, /v1/completions, "
                     "/v1/chat/completions, /v1/embeddings, /v1/classify, /health and /metrics")  # fmt: skip
    served.metrics.error(status)
    served.access(request, status, time.perf_counter())
    return error_response(error)
