"""What every route of one server shares: the loaded model and its engine, its name, key, limits and metrics, and
the checks each request passes (the key, the model id, the prompt's length), with one access-log line a request."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from typing import Any

from starlette.requests import Request

from softprompt.formats.errors import PromptBankError, UnknownTaskError
from softprompt.runtime import Engine, Task

from .metrics import Metrics
from .protocol import ApiError, Limits, read_body

log = logging.getLogger("softprompt.server")


@dataclasses.dataclass(eq=False)
class Served:
    model: Any  # a loaded export: Model, Seq2Seq or Encoder
    name: str
    api_key: str | None
    limits: Limits
    engine: Engine | None  # None for an encoder (it embeds in the request's thread)
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    closing: bool = False
    beside: list[Served] = dataclasses.field(default_factory=list, repr=False)  # the exports of the same server

    def model_ids(self) -> list[str]:
        return [self.name, *(f"{self.name}:{task}" for task in self.model.tasks)]

    def server_ids(self) -> list[str]:
        """Every model id the server answers, this export's and those beside it."""
        return [i for one in (self.beside or [self]) for i in one.model_ids()]

    def resolve(self, model_id: str) -> Task | None:
        """The task a model id names (None: the backbone), resolved once: the request's template, checks and run
        all use this version of it, even if its files are swapped meanwhile."""
        if model_id == self.name:
            return None
        base, _, task = model_id.partition(":")
        if base == self.name:
            try:
                return self.model.resolve_tasks([task])[0]
            except UnknownTaskError:
                pass
            except PromptBankError as exc:  # in the bank, but it failed to load: say why
                raise ApiError(404, str(exc), param="model", code="model_not_found") from None
        known = ", ".join(self.server_ids())
        raise ApiError(404, f"model {model_id!r} does not exist; models: {known}", param="model", code="model_not_found")

    def authorize(self, request: Request) -> None:
        """The Bearer key, compared in constant time."""
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")

    async def body(self, request: Request) -> dict:
        """A POST's JSON object, once the key is checked and unless the server is closing (read once: the route that
        chose this export by the body's model id read it already)."""
        self.authorize(request)
        if self.closing:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        if not hasattr(request.state, "body"):
            request.state.body = await read_body(request, self.limits)
        return request.state.body

    def check_prompt(self, ids: list[int], task: Task | None, max_new_tokens: int) -> None:
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}", param="prompt")
        limit = self.model.config.max_positions
        used = self.model.task_length(task) + len(ids) + (max_new_tokens if self.model.config.kind == "decoder" else 0)
        if limit is not None and used > limit:
            raise ApiError(400, f"prompt, task and max_tokens need {used} positions; the model has {limit}", param="max_tokens")

    def access(self, request: Request, status: int, started: float, tokens: int | None = None) -> None:
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


def now() -> int:
    return int(time.time())


def pick(served: list[Served], model_id) -> Served:
    """The export a model id names (`NAME` or `NAME:TASK`) among those one server serves; an id naming none is a 404
    that lists every id there is."""
    if not isinstance(model_id, str) or len(served) == 1:
        return served[0]  # the request's own checks say what is wrong with its id
    for one in served:
        if model_id == one.name or model_id.startswith(one.name + ":"):
            return one
    known = ", ".join(served[0].server_ids())
    raise ApiError(404, f"model {model_id!r:.80} does not exist; models: {known}", param="model", code="model_not_found")
