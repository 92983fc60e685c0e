"""The OpenAI API as this server speaks it: request bodies parsed into typed requests (or refused with an OpenAI
error object naming the field), and the response bodies and stream chunks built from the runtime's results.

Nothing here runs a model. A field the server cannot honour is refused, never ignored.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from softprompt.runtime import GenerationSettings, RequestError


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048
    max_batch: int = 16
    max_queue: int = 256


class ApiError(Exception):
    """An OpenAI error object: status, message, type, the field at fault and a code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": str(error), "type": error.kind, "param": error.param, "code": error.code}}
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(body, status_code=error.status, headers=headers)


# OpenAI fields this server cannot honour: refused rather than silently ignored (absent, null, false, empty, best_of 1
# or a text response_format is fine).
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "functions", "logit_bias", "response_format")
HARMLESS = (("best_of", 1), ("response_format", {"type": "text"}))


async def read_body(request: Request, limits: Limits) -> dict:
    """The request's JSON object, read no further than `limits.max_body_bytes`."""
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


def model_id(data: dict) -> str:
    value = data.get("model")
    if not isinstance(value, str):
        raise ApiError(400, f"model is {value!r:.60}; expected a model id string", param="model")
    return value


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A completion (`prompts`: a choice each) or a chat completion (`messages`), with its settings."""

    model: str
    settings: GenerationSettings
    prompts: list[str] | None = None
    messages: list | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @classmethod
    def completion(cls, data: dict, limits: Limits) -> GenerationRequest:
        prompt = data.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, f"prompt is {prompt!r:.60}; expected a string or a list of strings", param="prompt")
        if len(prompts) > limits.max_batch:
            raise ApiError(400, f"{len(prompts)} prompts in one request; the limit is {limits.max_batch}", param="prompt")
        return cls(model_id(data), _settings(data, limits), prompts=prompts, **_streaming(data))

    @classmethod
    def chat_completion(cls, data: dict, limits: Limits) -> GenerationRequest:
        messages = data.get("messages")  # checked against the chat template's needs by the runtime
        return cls(model_id(data), _settings(data, limits), messages=messages, **_streaming(data))


def _streaming(data: dict) -> dict:
    for key, wanted in (("stream", bool), ("stream_options", dict)):
        if data.get(key) is not None and not isinstance(data[key], wanted):
            raise ApiError(400, f"{key} is {data[key]!r:.60}; expected a {wanted.__name__}", param=key)
    return {"stream": bool(data.get("stream")), "include_usage": bool((data.get("stream_options") or {}).get("include_usage"))}


def _settings(data: dict, limits: Limits) -> GenerationSettings:
    for key in UNSUPPORTED:
        value = data.get(key)
        if value not in (None, False, "", [], {}) and (key, value) not in HARMLESS:
            raise ApiError(400, f"{key} is not supported by this server", param=key)
    if data.get("n", 1) != 1:
        raise ApiError(400, f"n is {data.get('n')!r}; this server makes one choice per request (n=1)", param="n")
    fields: dict[str, Any] = {}
    for key, value in (
        ("max_new_tokens", data.get("max_completion_tokens", data.get("max_tokens"))),
        ("temperature", data.get("temperature")),
        ("top_p", data.get("top_p")),
        ("seed", data.get("seed")),
        ("stop", data.get("stop")),
        ("min_new_tokens", data.get("min_tokens")),  # vLLM's extension: end of sequence (and a label) held off so long
    ):
        if value is not None:
            fields[key] = value
    least = data.get("min_tokens")
    if least is not None and (not isinstance(least, int) or isinstance(least, bool) or least < 0):
        raise ApiError(400, f"min_tokens is {least!r:.60}; expected a whole number >= 0", param="min_tokens")
    most = fields.get("max_new_tokens", GenerationSettings.max_new_tokens)
    if least is not None and isinstance(most, int) and least > most:
        raise ApiError(400, f"min_tokens {least} is above max_tokens {most}", param="min_tokens")
    if isinstance(fields.get("max_new_tokens"), int) and fields["max_new_tokens"] > limits.max_tokens:
        raise ApiError(400, f"max_tokens {fields['max_new_tokens']}; the limit is {limits.max_tokens}", param="max_tokens")
    try:
        return GenerationSettings.of(None, **fields)
    except RequestError as exc:
        raise ApiError(400, str(exc)) from None


@dataclasses.dataclass(frozen=True)
class TextsRequest:
    """/v1/embeddings and /v1/classify: a model id and its inputs."""

    model: str
    texts: list[str]
    encoding_format: str = "float"
    dimensions: int | None = None

    @classmethod
    def of(cls, data: dict) -> TextsRequest:
        given = data.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, f"input is {given!r:.60}; expected a string or a list of strings", param="input")
        encoding = data.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"encoding_format {encoding!r}; expected float or base64", param="encoding_format")
        return cls(model_id(data), texts, encoding, data.get("dimensions"))


# ---- responses ---------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice(index: int, final, chat: bool) -> dict:
    """A finished row (the runtime's RowText) as one of a response's choices."""
    answer: dict = {"index": index, "finish_reason": final.finish_reason or "length"}
    if chat:
        answer["message"] = {"role": "assistant", "content": final.text}
    else:
        answer |= {"text": final.text, "logprobs": None}
    return answer


def chunk(base: dict, index: int, piece: str, chat: bool, first: bool, finish_reason: str | None) -> str:
    """One server-sent event of a stream: a piece of choice `index`'s text."""
    if chat:
        delta = {"role": "assistant", "content": piece} if first else {"content": piece}
        part = {"index": index, "delta": delta, "finish_reason": finish_reason}
    else:
        part = {"index": index, "text": piece, "logprobs": None, "finish_reason": finish_reason}
    body = {**base, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [part]}
    return event(body)


def event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def embeddings_body(model: str, vectors: np.ndarray | Sequence[np.ndarray], encoding: str, tokens: int) -> dict:
    def encoded(vector):  # base64: little-endian float32 bytes, as OpenAI sends them
        if encoding == "base64":
            return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
        return [float(x) for x in vector]

    items = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": items, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def model_object(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "softprompt"}
