"""Generation settings: checked once, when a request arrives, then passed down as one frozen value."""

from __future__ import annotations

import dataclasses
import numbers

from .errors import RequestError, RequestTypeError


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How to generate: `max_new_tokens` at most (64), `min_new_tokens` before end-of-sequence is allowed,
    `temperature` 0 for greedy (else sampled, optionally from the `top_k` tokens or the `top_p` mass),
    `seed` for sampling, and `stop` strings (the text is cut before the first one found)."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if not (value is None and name in ("top_k", "seed")) and not _is_int(value):
                raise RequestTypeError(f"{name} {value!r}; expected a whole number")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not (value is None and name == "top_p") and not _is_real(value):
                raise RequestTypeError(f"{name} {value!r}; expected a number")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            try:
                object.__setattr__(self, "stop", tuple(self.stop or ()))
            except TypeError:
                raise RequestTypeError(f"stop {self.stop!r}; expected a string or a list of strings") from None
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise RequestTypeError(f"stop string {stop!r}; expected non-empty text")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestError(f"seed {self.seed}; expected 0 to 2**64 - 1")
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens {self.max_new_tokens}; expected at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise RequestError(f"min_new_tokens {self.min_new_tokens}; expected 0..max_new_tokens ({self.max_new_tokens})")
        if not (0 <= self.temperature < float("inf")):  # NaN fails every comparison
            raise RequestError(f"temperature {self.temperature}; expected 0 (greedy) or a finite positive value")
        if self.top_k is not None and self.top_k < 1:
            raise RequestError(f"top_k {self.top_k}; expected at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:  # (NaN fails it too)
            raise RequestError(f"top_p {self.top_p}; expected a value in (0, 1]")

    @classmethod
    def of(cls, settings: GenerationSettings | None = None, **overrides) -> GenerationSettings:
        """`settings` (or the defaults) with `overrides` applied; an unknown name is refused, with the known ones."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise RequestError(f"unknown generation settings {unknown}; expected some of {sorted(known)}")
        base = settings if settings is not None else cls()
        return dataclasses.replace(base, **overrides) if overrides else base


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
