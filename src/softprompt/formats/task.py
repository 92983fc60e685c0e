"""What a task is besides its vectors: a text template (hard prompt) and, for classification, labels.

Stored in the task's record (`NAME.json`, field `extra`) so that training and the runtime wrap
inputs the same way: `{"template": "Review: {text}\\nSentiment:", "labels": {"positive": " positive"}}`.

A template may also place the soft prompt's vectors (P-tuning's patterns, Liu et al. 2021):
`{soft:N}` is a slot for the next N vectors, e.g. `"{soft:4}Review: {text}{soft:2} Sentiment:"`.
The slots take the vectors in order and must account for all of them. Vectors before the template's
first text (`lead`) are prepended like a plain prompt's, and a decoder caches them; the others
stand in the token ids as negative numbers, -1 for the first vector after the lead, -2 for the
next, which is how `encode` hands them to the runtime and to training alike.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .errors import InvalidPromptError

PLACEHOLDER = "{text}"
SLOT = re.compile(r"\{soft:(\d+)\}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How a task's inputs are wrapped and, for classification, which words stand for which label."""

    template: str = PLACEHOLDER
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> verbalizer text

    def __post_init__(self):
        check_template(self.template)
        seen: dict[str, str] = {}
        for label, words in self.labels.items():
            if not isinstance(label, str) or not label or not isinstance(words, str) or not words:
                raise InvalidPromptError(f"label {label!r} -> verbalizer {words!r}; expected two non-empty strings")
            if words in seen:
                raise InvalidPromptError(
                    f"labels {seen[words]!r} and {label!r} share the verbalizer {words!r}; classify could not tell them apart"
                )
            seen[words] = label

    @property
    def kind(self) -> str:
        return "classification" if self.labels else "generation"

    def apply(self, text: str) -> str:
        """The templated input as text (slots left out). Plain replacement, so braces elsewhere in the template stay
        as written."""
        return SLOT.sub("", self.template).replace(PLACEHOLDER, text)

    @functools.cached_property
    def slots(self) -> list[int]:
        """The vector count of each `{soft:N}` slot, in order (empty: the vectors all lead)."""
        return [int(n) for n in SLOT.findall(self.template)]

    @property
    def lead(self) -> int | None:
        """How many vectors come before the template's first text (None: a template without slots, all of them)."""
        return _leading_slots(self.template)[0] if self.slots else None

    def encode(self, text: str, encode: Callable[..., list[int]]) -> list[int]:
        """Token ids of the templated `text`, as `encode(text, add_special_tokens=...)` makes them, with the slots
        after the lead as negative ids (-1: the first vector after the lead). Text between slots is tokenized
        piece by piece, the tokenizer's special tokens going around the whole as they would around one text."""
        if not self.slots:
            return encode(self.apply(text))
        rest = _leading_slots(self.template)[1]
        if not SLOT.search(rest):
            return encode(rest.replace(PLACEHOLDER, text))  # only leading slots: exactly a plain prompt's row
        before, after = _specials(encode)
        ids = list(before)
        inner = 0
        position = 0
        for match in SLOT.finditer(rest):
            piece = rest[position : match.start()]
            if piece:
                ids += encode(piece.replace(PLACEHOLDER, text), add_special_tokens=False)
            count = int(match.group(1))
            ids += [-(inner + k + 1) for k in range(count)]
            inner += count
            position = match.end()
        if rest[position:]:
            ids += encode(rest[position:].replace(PLACEHOLDER, text), add_special_tokens=False)
        return ids + list(after)

    def check_length(self, length: int, where: str) -> None:
        """A template with slots must account for exactly the task's `length` vectors."""
        slots = self.slots
        if slots and sum(slots) != length:
            raise InvalidPromptError(
                f"{where}: template {self.template!r} has slots for {' + '.join(map(str, slots))} = {sum(slots)} vectors; "
                f"the task has {length}"
            )

    def verbalizer_ids(self, encode: Callable[..., list[int]]) -> dict[str, list[int]]:
        """Each label's token ids, tokenized alone without special tokens: the one rule training and the runtime share."""
        return {label: encode(words, add_special_tokens=False) for label, words in self.labels.items()}

    def to_extra(self) -> dict[str, Any]:
        return {"template": self.template, "labels": dict(self.labels), "kind": self.kind}

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None, where: str = "task record") -> TaskSpec:
        extra = extra or {}
        template = extra.get("template", PLACEHOLDER)
        labels = extra.get("labels") or {}
        if not isinstance(template, str) or not isinstance(labels, dict):
            raise InvalidPromptError(f"{where}: template {template!r} / labels {labels!r}; expected a string and an object")
        try:
            return cls(template=template, labels=dict(labels))
        except InvalidPromptError as exc:
            raise InvalidPromptError(f"{where}: {exc}") from None


def check_template(template: str) -> str:
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise InvalidPromptError(f"template {template!r} must contain {PLACEHOLDER} exactly once")
    for match in SLOT.finditer(template):
        if int(match.group(1)) == 0:
            raise InvalidPromptError(
                f"template {template!r}: slot {match.group(0)} holds no vectors; expected {{soft:N}}, N >= 1"
            )
    return template


def _leading_slots(template: str) -> tuple[int, str]:
    """The vectors of the slots a template starts with, and the template after them."""
    count = 0
    while (match := SLOT.match(template)) is not None:
        count += int(match.group(1))
        template = template[match.end() :]
    return count, template


def _specials(encode: Callable[..., list[int]]) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] ... [SEP], a BOS), found by a probe."""
    probe = "x"
    plain = encode(probe, add_special_tokens=False)
    full = encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def unescape(text: str) -> str:
    """`"Review: {text}\\nSentiment:"` typed in a shell arrives with a backslash and an n."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def default_verbalizers(labels: list[str]) -> dict[str, str]:
    """A label's words default to its name after a space (' positive'), as a model would write it mid-sentence."""
    return {label: " " + label.replace("_", " ") for label in labels}


def parse_verbalizers(items: list[str]) -> dict[str, str]:
    """Parse `label=words` options (`positive=" positive"`); quotes around the words are optional."""
    out: dict[str, str] = {}
    for item in items:
        label, sep, words = item.partition("=")
        if not sep or not label:
            raise InvalidPromptError(f"verbalizer {item!r}; expected LABEL=WORDS, e.g. positive=' positive'")
        if len(words) >= 2 and words[0] == words[-1] and words[0] in "'\"":
            words = words[1:-1]
        if not words:
            raise InvalidPromptError(f"verbalizer {item!r} has no words after '='")
        out[label] = words
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Head:
    """A linear classifier on an encoder's output, rows in the order of the task's labels.

    `pooling` "mean": the normalised mean over the text's tokens (what `train-prompt --head linear`
    trains); "pooler": the model's pooler output (BERT: dense + tanh of the first position, which
    under a prompt is the first prompt row), what PEFT's sequence classification trains.
    """

    weight: np.ndarray
    bias: np.ndarray
    pooling: str = "mean"


def parse_head(data: Any, names: list[str], width: int, where: str) -> Head | None:
    """The head's weight and bias with rows in the order of the task's labels (None: the task has no head)."""
    if data is None:
        return None
    try:
        weight = np.asarray(data["weight"], dtype=np.float32)
        bias = np.asarray(data["bias"], dtype=np.float32)
        order = [list(data["labels"]).index(label) for label in names]
        pooling = data.get("pooling", "mean")
    except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:
        raise InvalidPromptError(
            f"{where}: head must be {{'labels': [...], 'weight': [[...]], 'bias': [...]}} naming the task's labels {names} ({exc})"
        ) from None
    labels = len(names)
    if weight.shape != (labels, width) or bias.shape != (labels,) or not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise InvalidPromptError(
            f"{where}: head weight {weight.shape} / bias {bias.shape}; expected ({labels}, {width}) and ({labels},) finite values"
        )
    if pooling not in ("mean", "pooler"):
        raise InvalidPromptError(f"{where}: head pooling {pooling!r}; expected 'mean' or 'pooler'")
    return Head(weight[order], bias[order], pooling)
