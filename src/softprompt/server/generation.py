"""POST /v1/completions and /v1/chat/completions: each prompt a row of the engine's running batch, answered whole or
streamed as server-sent events (each choice's pieces in turn; all of them are generated together)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from softprompt.formats.errors import SoftpromptError
from softprompt.runtime import Job, QueueFull, RequestError

from .protocol import ApiError, GenerationRequest, choice, chunk, event, usage
from .served import Served, now


async def completions(served: Served, request: Request) -> Response:
    return await generate(served, request, GenerationRequest.completion(await served.body(request), served.limits))


async def chat_completions(served: Served, request: Request) -> Response:
    return await generate(served, request, GenerationRequest.chat_completion(await served.body(request), served.limits))


async def generate(served: Served, request: Request, asked: GenerationRequest) -> Response:
    if served.engine is None:
        raise ApiError(400, f"{served.name} is an encoder: it serves /v1/embeddings and /v1/classify", param="model")
    task = served.resolve(asked.model)
    request.state.model = asked.model
    model = served.model
    try:
        if asked.chat:
            rows = [model.backbone.encode(model.render_chat(asked.messages, task), add_special_tokens=False)]
        else:
            rows = [model.encode(prompt, task) for prompt in asked.prompts or []]
    except RequestError as exc:
        raise ApiError(400, str(exc), param="messages" if asked.chat else "prompt") from None
    for ids in rows:
        served.check_prompt(ids, task, asked.settings.max_new_tokens)
    jobs, queues = submit(served, rows, task, asked)
    started = time.perf_counter()
    base = {
        "id": ("chatcmpl-" if asked.chat else "cmpl-") + uuid.uuid4().hex[:24],
        "object": "chat.completion" if asked.chat else "text_completion",
        "created": now(),
        "model": asked.model,
    }
    if asked.stream:
        request.state.streaming = True
        return StreamingResponse(stream(served, request, jobs, queues, base, asked, started), media_type="text/event-stream")
    try:
        finals = [await finished(events) for events in queues]
    finally:
        for job in jobs:
            job.cancelled = True  # a client gone before the end frees nothing else; its rows are dropped
    for ids, final in zip(rows, finals):
        served.metrics.request(len(ids), len(final.ids), time.perf_counter() - started)
    request.state.tokens = sum(len(final.ids) for final in finals)
    body = {
        **base,
        "choices": [choice(i, final, asked.chat) for i, final in enumerate(finals)],
        "usage": usage(sum(map(len, rows)), request.state.tokens),
    }
    return JSONResponse(body)


def submit(served: Served, rows: list[list[int]], task, asked: GenerationRequest) -> tuple[list[Job], list[asyncio.Queue]]:
    """A job a row on the engine, each reporting into its own queue on this event loop; all or none."""
    assert served.engine is not None
    loop = asyncio.get_running_loop()
    jobs: list[Job] = []
    queues: list[asyncio.Queue] = []
    try:
        for ids in rows:
            events: asyncio.Queue = asyncio.Queue()

            def tell(kind, events=events):
                return lambda value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))

            job = Job(ids, task, asked.settings, on_step=tell("step"), on_done=tell("done"), on_error=tell("error"))
            served.engine.submit(job)
            jobs.append(job)
            queues.append(events)
    except QueueFull as exc:
        for job in jobs:
            job.cancelled = True
        raise ApiError(503 if served.closing else 429, str(exc), kind="server_error") from None
    return jobs, queues


async def finished(events: asyncio.Queue):
    while True:
        kind, value = await events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise value


async def stream(
    served: Served,
    request: Request,
    jobs: list[Job],
    queues: list[asyncio.Queue],
    base: dict,
    asked: GenerationRequest,
    started: float,
) -> AsyncIterator[str]:
    completion_tokens = 0
    status = 200
    try:
        for index, events in enumerate(queues):
            sent = 0
            first = True
            while True:
                kind, value = await events.get()
                if kind == "error":
                    status = 500
                    message = str(value) if isinstance(value, SoftpromptError) else "generation failed"
                    yield event({"error": {"message": message, "type": "server_error"}})
                    return
                done = kind == "done"
                text = value.text if done else value.stable_text()
                if len(text) > sent or done:
                    piece, sent = text[sent:], max(sent, len(text))
                    yield chunk(base, index, piece, asked.chat, first, (value.finish_reason or "length") if done else None)
                    first = False
                if done:
                    completion_tokens += len(value.ids)
                    served.metrics.request(len(jobs[index].ids), len(value.ids), time.perf_counter() - started)
                    break
        if asked.include_usage:
            yield event({**base, "choices": [], "usage": usage(sum(len(job.ids) for job in jobs), completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancelled = True  # a client that went away stops counting in its batch
        served.access(request, status, started, completion_tokens)
