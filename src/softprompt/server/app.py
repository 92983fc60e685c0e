"""The OpenAI-compatible HTTP app (Starlette): one loaded export, its bank's tasks as models, one engine.

Model ids: the backbone's name (no task) and `NAME:TASK` for every task of the bank, read again
for every request, so a task swapped into the bank folder is served from the next request. A
request for `NAME:TASK` gives what `run-model --task TASK` gives for the same input and settings:
the task's template is applied to the prompt (chat: to the last user message) and its soft prompt
or prefix leads it. Settings absent from a request take the runtime's defaults (greedy).

Errors are OpenAI's error objects (`{"error": {"message", "type", "param", "code"}}`) with 400
(a bad request), 401 (a missing or wrong key), 404 (an unknown model), 413 (a body too large),
429/503 with `Retry-After` (too many waiting requests, shutting down); never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from softprompt.formats.errors import PromptBankError, SoftpromptError, UnknownTaskError
from softprompt.runtime.encoder import Encoder
from softprompt.runtime.errors import RequestError
from softprompt.runtime.model import Model
from softprompt.runtime.settings import GenerationSettings
from softprompt.runtime.tasks import Task

from .continuous import ContinuousEngine
from .engine import Engine, Job, QueueFull, log
from .metrics import Metrics


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048
    max_batch: int = 16
    max_queue: int = 256


# OpenAI fields this server cannot honour: refused rather than silently ignored (absent, null, false, empty or
# best_of 1 is fine).
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "functions", "logit_bias", "response_format")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def error_response(error: ApiError, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": str(error), "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=headers)


def create_app(model, *, name: str, api_key: str | None = None, limits: Limits = Limits()) -> Starlette:
    """The app serving `model` (a loaded export) as `name` and `name:TASK`."""
    # Decoders batch continuously (a request joins the running batch at the next step); encoder-decoders in turns.
    kind = None if isinstance(model, Encoder) else ContinuousEngine if isinstance(model, Model) else Engine
    engine = None if kind is None else kind(model, limits.max_batch, limits.max_queue)
    metrics = Metrics()
    state = {"closing": False}

    def resolve(model_id: Any) -> Task | None:
        """The task a model id names (None: the backbone), resolved once: the request's template, checks and run
        all use this version of it, even if its files are swapped meanwhile."""
        if not isinstance(model_id, str):
            raise ApiError(400, f"model is {model_id!r:.60}; expected a model id string", param="model")
        if model_id == name:
            return None
        base, _, task = model_id.partition(":")
        if base == name:
            try:
                return model.resolve_tasks([task])[0]
            except UnknownTaskError:
                pass
            except PromptBankError as exc:  # in the bank, but it failed to load: say why
                raise ApiError(404, str(exc), param="model", code="model_not_found") from None
        known = ", ".join(model_ids())
        raise ApiError(404, f"model {model_id!r} does not exist; models: {known}", param="model", code="model_not_found")

    def model_ids() -> list[str]:
        return [name, *(f"{name}:{t}" for t in model.tasks)]

    def access(request: Request, status: int, started: float, tokens: int | None = None) -> None:
        """One line a request: method, path, model id, status, tokens generated, milliseconds."""
        log.info(
            "%s %s %s %d %s %.0f ms",
            request.method,
            request.url.path,
            getattr(request.state, "model", "-"),
            status,
            "-" if tokens is None else f"{tokens} tokens",
            1000 * (time.perf_counter() - started),
        )

    def authorize(request: Request) -> None:
        """The Bearer key, compared in constant time."""
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")

    async def read_json(request: Request) -> dict:
        authorize(request)
        if state["closing"]:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            raise ApiError(413, f"request body of {length} bytes; the limit is {limits.max_body_bytes}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"request body over {limits.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, f"the body is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the body is a JSON {type(data).__name__}; expected an object")
        return data

    def settings_of(data: dict) -> GenerationSettings:
        for key, wanted in (("stream", bool), ("stream_options", dict)):
            if data.get(key) is not None and not isinstance(data[key], wanted):
                raise ApiError(400, f"{key} is {data[key]!r:.60}; expected a {wanted.__name__}", param=key)
        for key in UNSUPPORTED:
            value = data.get(key)
            if (
                value is not None
                and value is not False
                and value != ""
                and value != []
                and value != {}
                and (key, value) != ("best_of", 1)
                and (key, value) != ("response_format", {"type": "text"})  # what every answer is
            ):
                raise ApiError(400, f"{key} is not supported by this server", param=key)
        if data.get("n", 1) != 1:
            raise ApiError(400, f"n is {data.get('n')!r}; this server makes one choice per request (n=1)", param="n")
        max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
        fields: dict[str, Any] = {}
        for key, value in (
            ("max_new_tokens", max_tokens),
            ("temperature", data.get("temperature")),
            ("top_p", data.get("top_p")),
            ("seed", data.get("seed")),
            ("stop", data.get("stop")),
        ):
            if value is not None:
                fields[key] = value
        if isinstance(fields.get("max_new_tokens"), int) and fields["max_new_tokens"] > limits.max_tokens:
            raise ApiError(400, f"max_tokens {fields['max_new_tokens']}; the limit is {limits.max_tokens}", param="max_tokens")
        try:
            return GenerationSettings.of(None, **fields)
        except RequestError as exc:
            raise ApiError(400, str(exc)) from None

    def check_prompt(ids: list[int], task: Task | None, settings: GenerationSettings) -> None:
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}", param="prompt")
        limit = model.config.max_positions
        used = model.task_length(task) + len(ids) + (settings.max_new_tokens if model.config.kind == "decoder" else 0)
        if limit is not None and used > limit:
            raise ApiError(400, f"prompt, task and max_tokens need {used} positions; the model has {limit}", param="max_tokens")

    async def generate(request: Request, data: dict, chat: bool) -> Response:
        if engine is None:
            raise ApiError(400, f"{name} is an encoder: it serves /v1/embeddings and /v1/classify", param="model")
        task = resolve(data.get("model"))
        request.state.model = data["model"]
        settings = settings_of(data)
        try:
            if chat:
                text = model.render_chat(data.get("messages"), task)
                rows = [model.backbone.encode(text, add_special_tokens=False)]
            else:
                rows = [model.encode(prompt, task) for prompt in prompts_of(data)]
        except RequestError as exc:
            raise ApiError(400, str(exc), param="messages" if chat else "prompt") from None
        for ids in rows:
            check_prompt(ids, task, settings)
        loop = asyncio.get_running_loop()
        jobs: list[Job] = []
        queues: list[asyncio.Queue] = []
        try:
            for ids in rows:  # one row a prompt; each its own choice, all in the running batch together
                events: asyncio.Queue = asyncio.Queue()

                def tell(kind, events=events):
                    return lambda value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))

                job = Job(ids, task, settings, on_step=tell("step"), on_done=tell("done"), on_error=tell("error"))
                engine.submit(job)
                jobs.append(job)
                queues.append(events)
        except QueueFull as exc:
            for job in jobs:
                job.cancelled = True
            raise ApiError(503 if state["closing"] else 429, str(exc), kind="server_error") from None
        kind = "chat.completion" if chat else "text_completion"
        answer_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        started = time.perf_counter()
        base = {"id": answer_id, "object": kind, "created": int(time.time()), "model": data["model"]}
        prompt_tokens = sum(map(len, rows))
        if data.get("stream"):
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            request.state.streaming = True
            chunks = stream(request, jobs, queues, base, chat, prompt_tokens, include_usage, started)
            return StreamingResponse(chunks, media_type="text/event-stream")
        try:
            finals = [await finished(events) for events in queues]
        finally:
            for job in jobs:
                job.cancelled = True  # a client gone before the end frees nothing else; its rows are dropped
        choices = []
        for index, (ids, final) in enumerate(zip(rows, finals)):
            metrics.request(len(ids), len(final.ids), time.perf_counter() - started)
            choice: dict = {"index": index, "finish_reason": final.finish_reason or "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": final.text}
            else:
                choice |= {"text": final.text, "logprobs": None}
            choices.append(choice)
        completion_tokens = sum(len(final.ids) for final in finals)
        request.state.tokens = completion_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return JSONResponse({**base, "choices": choices, "usage": usage})

    def prompts_of(data: dict) -> list[str]:
        """A completion's prompts: a string, or a list of strings (a choice each, as OpenAI's API answers it)."""
        prompt = data.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, f"prompt is {prompt!r:.60}; expected a string or a list of strings", param="prompt")
        if len(prompts) > limits.max_batch:
            raise ApiError(400, f"{len(prompts)} prompts in one request; the limit is {limits.max_batch}", param="prompt")
        return prompts

    async def finished(events: asyncio.Queue):
        while True:
            kind, value = await events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value

    async def stream(request, jobs, queues, base, chat, prompt_tokens, include_usage, started) -> AsyncIterator[str]:
        """Server-sent events: each choice's pieces in turn (all of them are generated together), then usage, [DONE]."""
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
                        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                        return
                    done = kind == "done"
                    text = value.text if done else value.stable_text()
                    if len(text) > sent or done:
                        piece, sent = text[sent:], max(sent, len(text))
                        if chat:
                            delta = {"role": "assistant", "content": piece} if first else {"content": piece}
                            choice = {"index": index, "delta": delta, "finish_reason": None}
                        else:
                            choice = {"index": index, "text": piece, "logprobs": None, "finish_reason": None}
                        if done:
                            choice["finish_reason"] = value.finish_reason or "length"
                        chunk = {**base, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                        first = False
                    if done:
                        completion_tokens += len(value.ids)
                        metrics.request(len(jobs[index].ids), len(value.ids), time.perf_counter() - started)
                        break
            if include_usage:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancelled = True  # a client that went away stops counting in its batch
            access(request, status, started, completion_tokens)

    def texts_of(data: dict) -> list[str]:
        given = data.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, f"input is {given!r:.60}; expected a string or a list of strings", param="input")
        return texts

    async def completions(request: Request) -> Response:
        return await generate(request, await read_json(request), chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, await read_json(request), chat=True)

    async def embeddings(request: Request) -> Response:
        data = await read_json(request)
        if not isinstance(model, Encoder):
            raise ApiError(400, f"{name} generates text; embeddings come from encoder exports", param="model")
        task = resolve(data.get("model"))
        request.state.model = data["model"]
        texts = texts_of(data)
        width = model.config.hidden_size
        if data.get("dimensions") not in (None, width):  # no Matryoshka training here: a cut vector would be another
            raise ApiError(
                400,
                f"dimensions {data['dimensions']!r:.20}; this model's embeddings have {width} (the only value)",
                param="dimensions",
            )
        encoding = data.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"encoding_format {encoding!r}; expected float or base64", param="encoding_format")
        vectors = await run_in_threadpool(model.embed, texts, task)
        tokens = sum(len(model.encode(t, task)) for t in texts)

        def encoded(vector):  # base64: little-endian float32 bytes, as OpenAI sends them
            return (
                base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
                if encoding == "base64"
                else [float(x) for x in vector]
            )

        items = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
        return JSONResponse(
            {"object": "list", "data": items, "model": data["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        )

    async def classify(request: Request) -> Response:
        data = await read_json(request)
        task = resolve(data.get("model"))
        request.state.model = data["model"]
        if task is None:
            raise ApiError(400, f"classify needs a task's model id ({name}:TASK) whose task has labels", param="model")
        results = await run_in_threadpool(model.classify, texts_of(data), task)
        return JSONResponse(
            {"object": "list", "model": data["model"], "data": [{"index": i, **r} for i, r in enumerate(results)]}
        )

    def model_object(model_id: str, created: int) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "softprompt"}

    async def models(request: Request) -> Response:
        authorize(request)
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [model_object(i, created) for i in model_ids()]})

    async def one_model(request: Request) -> Response:
        """GET /v1/models/{id} (the openai client's models.retrieve)."""
        authorize(request)
        model_id = request.path_params["model_id"]
        request.state.model = model_id
        resolve(model_id)  # 404 with the known ids, or the reason a task of the bank is not served
        return JSONResponse(model_object(model_id, int(time.time())))

    async def not_found(request: Request, exc: Exception) -> Response:
        """Unknown routes and methods as OpenAI error objects, not Starlette's plain text."""
        status = getattr(exc, "status_code", 404)
        what = "no route" if status == 404 else f"{request.method} is not allowed on"
        error = ApiError(status, f"{what} {request.url.path}; this server serves /v1/models, /v1/completions, "
                         "/v1/chat/completions, /v1/embeddings, /v1/classify, /health and /metrics")  # fmt: skip
        metrics.error(status)
        access(request, status, time.perf_counter())
        return error_response(error)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "shutting down" if state["closing"] else "ok", "tasks": len(model.tasks)})

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    def guarded(handler):
        async def run(request: Request) -> Response:
            started = time.perf_counter()
            response = await answer(handler, request)
            if not getattr(request.state, "streaming", False) or response.status_code != 200:  # a stream logs at its end
                access(request, response.status_code, started, getattr(request.state, "tokens", None))
            return response

        return run

    async def answer(handler, request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            metrics.error(exc.status)
            retry = {"Retry-After": "1"} if exc.status in (429, 503) else None
            return error_response(exc, retry)
        except UnknownTaskError as exc:  # a task removed from the bank between the lookup and the run
            metrics.error(404)
            return error_response(ApiError(404, str(exc), param="model", code="model_not_found"))
        except SoftpromptError as exc:
            metrics.error(400)
            return error_response(ApiError(400, str(exc)))
        except Exception:  # never a traceback to the client; the server's log has it
            log.exception("request failed")
            metrics.error(500)
            return error_response(ApiError(500, "the server failed on this request", kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state["closing"] = True
        if engine is not None:
            await run_in_threadpool(engine.close, 60.0)

    routes = [
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/embeddings", guarded(embeddings), methods=["POST"]),
        Route("/v1/classify", guarded(classify), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", guarded(one_model), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.engine = engine
    return app
