"""Chat messages rendered with the model's own chat template, as transformers' `apply_chat_template` renders them.

An instruct model answers well only in the format it was tuned on. The export keeps the model's
template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`); it is rendered
here the way transformers renders it (a sandboxed Jinja environment with `trim_blocks` and
`lstrip_blocks`, loop controls, its `tojson`, `raise_exception` and `strftime_now`, the tokenizer's
special tokens as variables) and tokenized without adding special tokens, since the template
writes them. A test compares the ids with transformers' on a tiny model.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from softprompt.formats.export_folder import chat_template_source

from .errors import RequestError, RequestTypeError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: Mapping[str, str]  # bos_token, eos_token, ... as the template sees them

    @cached_property
    def _compiled(self):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = tojson
        environment.globals["raise_exception"] = raise_exception
        environment.globals["strftime_now"] = lambda format: dt.datetime.now().strftime(format)
        return environment.from_string(self.source)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self._compiled.render(
                messages=list(messages),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as exc:  # the template's own raise_exception, or a render error
            raise RequestError(f"the model's chat template refused the messages: {exc}") from None


def read_chat_template(folder: Path) -> ChatTemplate | None:
    """The export's chat template and special tokens; None where the model has no template."""
    source, config = chat_template_source(folder)
    if source is None:
        return None
    special = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):  # a serialised AddedToken
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    return ChatTemplate(source, special)


def check_messages(messages: Any) -> list[dict]:
    """A conversation as the template expects it: a non-empty list of {"role": str, "content": str, ...}."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise RequestTypeError(f"messages {messages!r:.80}; expected a non-empty list of {{'role': ..., 'content': ...}}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise RequestTypeError(f"message {i} is {message!r:.80}; expected {{'role': str, 'content': str}}")
        if not isinstance(message.get("content"), str):
            raise RequestTypeError(f"message {i}'s content is {message.get('content')!r:.80}; expected a string")
    return [dict(message) for message in messages]


def user_turn(text: str, system: str | None = None) -> list[dict]:
    """A conversation of one user message, after a system message where one is given."""
    return [*([{"role": "system", "content": system}] if system is not None else []), {"role": "user", "content": text}]
