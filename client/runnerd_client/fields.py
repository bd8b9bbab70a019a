"""What a request's fields may hold, declared beside them: a field's type, and the checks in
its `Annotated` metadata (a closed set, a range, a pattern, a length, an absolute path,
plain JSON). The daemon checks every request it decodes (`decode_request`); the client
checks every request before it sends it (`check_fields`), so that a wrong argument raises
TypeError or ValueError at the call instead of a refusal nobody sees. The client's own
options (retries, a sweep's jobs) are declared and checked in the same terms.

    run_id: RunId            # 1-64 characters of A-Z, a-z, 0-9, '_' or '-'
    limit: Limit = 50        # 1 to MAX_LIST
    reason: Annotated[str, OneOf.of(FailReason.CRASH, ...)] = FailReason.CRASH
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields
from typing import Annotated, Any, Protocol

from runnerd_client.enums import RetryOn
from runnerd_client.errors import ErrorCode, RunnerdError
from runnerd_client.framing import INT64_MAX, INT64_MIN
from runnerd_client.ids import RUN_ID_PATTERN

MAX_NAME = 256
"""Characters of an experiment's or a variation's name."""
MAX_LIST = 10_000
"""Items one page of a list may ask for."""


class Check(Protocol):
    def problem(self, value: Any) -> str | None:
        """What is wrong with a value given ("must be ..."), or None."""


# The checks are plain classes: a dataclass costs a client's start-up ~0.5 ms to make.


class OneOf:
    """A closed set (an enum's values, or some of them); each item, for a list."""

    __slots__ = ("values",)

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = values

    @classmethod
    def of(cls, *members: enum.StrEnum | type[enum.StrEnum]) -> OneOf:
        """All the values of an enum, or the members named."""
        return cls(tuple(str(v) for m in members for v in (m if isinstance(m, type) else (m,))))

    def problem(self, value: Any) -> str | None:
        items = value if isinstance(value, list) else (value,)
        if all(item in self.values for item in items):
            return None
        return f"must be one of {', '.join(self.values)}"


class Range:
    """A number from `low` (excluded with `above`) up to `high`; `what` says it in words."""

    __slots__ = ("low", "high", "above", "what")

    def __init__(
        self, low: float, high: float | None = None, above: bool = False, what: str | None = None
    ) -> None:
        self.low, self.high, self.above, self.what = low, high, above, what

    def problem(self, value: Any) -> str | None:
        if (value > self.low if self.above else value >= self.low) and (
            self.high is None or value <= self.high
        ):
            return None
        if self.what is not None:
            return f"must be {self.what}"
        if self.above and self.low == 0:
            return "must be positive"
        if self.high is None:
            return f"must be {self.low:g} or more"
        return f"must be between {self.low:g} and {self.high:g}"


class Pattern:
    __slots__ = ("regex", "what")

    def __init__(self, regex: re.Pattern[str], what: str) -> None:
        self.regex, self.what = regex, what

    def problem(self, value: Any) -> str | None:
        return None if self.regex.fullmatch(value) else f"must be {self.what}"


class Length:
    __slots__ = ("low", "high")

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def problem(self, value: Any) -> str | None:
        return (
            None
            if self.low <= len(value) <= self.high
            else f"must be {self.low}-{self.high} characters"
        )


class Absolute:
    """An absolute path (no NUL in it)."""

    __slots__ = ()

    def problem(self, value: Any) -> str | None:
        return None if os.path.isabs(value) and "\0" not in value else "must be an absolute path"


class PlainJson:
    """A value JSON can hold (kept as JSON text in the registry): no NaN or infinity, no
    object JSON cannot write."""

    __slots__ = ()

    def problem(self, value: Any) -> str | None:
        try:
            json.dumps(value, allow_nan=False)
        except ValueError:
            return "must be plain JSON: it holds NaN or infinity"
        except (TypeError, RecursionError) as exc:
            return f"must be plain JSON: {exc}"
        return None


RunId = Annotated[str, Pattern(RUN_ID_PATTERN, "1-64 characters of A-Z, a-z, 0-9, '_' or '-'")]
Name = Annotated[str, Length(1, MAX_NAME)]
AbsolutePath = Annotated[str, Absolute()]
Positive = Annotated[float, Range(0, above=True)]
Limit = Annotated[int, Range(1, MAX_LIST)]
JsonMap = Annotated[dict[str, Any], PlainJson()]
RetryCount = Annotated[int, Range(0)]
Backoff = Annotated[float, Range(0)]
"""Seconds: the base of the wait `backoff ** attempt` before a retry."""
RetryWhen = Annotated[str, OneOf.of(RetryOn)]
Jobs = Annotated[int, Range(1)]


# --- decoding a request's fields ----------------------------------------------------


class FieldSpec:
    """One field of a request class: the types msgpack may deliver, whether it is required,
    and its checks."""

    __slots__ = ("name", "types", "required", "checks")

    def __init__(
        self, name: str, types: tuple[type, ...], required: bool, checks: tuple[Check, ...]
    ) -> None:
        self.name, self.types, self.required, self.checks = name, types, required, checks


_SPECS: dict[type, tuple[FieldSpec, ...]] = {}


def field_specs(cls: type) -> tuple[FieldSpec, ...]:
    """The fields of a request class: the types msgpack may deliver for each, whether it is
    required, and its checks (cached)."""
    specs = _SPECS.get(cls)
    if specs is None:
        plain = typing.get_type_hints(cls)
        extra = typing.get_type_hints(cls, include_extras=True)
        specs = _SPECS[cls] = tuple(
            FieldSpec(
                f.name,
                _allowed_types(plain[f.name]),
                f.default is MISSING and f.default_factory is MISSING,
                tuple(_checks(extra[f.name])),
            )
            for f in fields(cls)
        )
    return specs


def decode_fields(op: str, specs: Iterable[FieldSpec], msg: dict[Any, Any]) -> dict[str, Any]:
    """The fields of `msg`, each checked against its spec; RunnerdError(bad_request) naming
    the first that is missing, mistyped or out of bounds."""
    kwargs: dict[str, Any] = {}
    for spec in specs:
        if spec.name not in msg:
            if spec.required:
                raise _bad(f"{op}: missing field {spec.name!r}")
            continue
        value = msg[spec.name]
        problem = _problem(spec, value)
        if problem is not None:
            raise _bad(
                f"{op}: {spec.name} {problem.text}"
                if problem.checked
                else f"{op}: field {spec.name!r} {problem.text}"
            )
        kwargs[spec.name] = value
    return kwargs


def check_fields(obj: object) -> None:
    """The client's check of a request before it is sent (or of any dataclass whose fields
    are declared so): TypeError (a field's type) or ValueError (its bounds) naming the
    first field that is wrong."""
    for spec in field_specs(type(obj)):
        problem = _problem(spec, getattr(obj, spec.name))
        if problem is not None:
            raise _argument_error(spec.name, problem)


def check_argument(name: str, annotation: Any, value: Any) -> None:
    """Check an argument that is not a request's field (`retries`, `jobs`...) against a
    declaration in the same terms: TypeError or ValueError naming it."""
    spec = FieldSpec(name, _allowed_types(annotation), True, tuple(_checks(annotation)))
    problem = _problem(spec, value)
    if problem is not None:
        raise _argument_error(name, problem)


def check_callable(name: str, fn: object) -> None:
    """TypeError naming an argument that should be a function and is not."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, not {type(fn).__name__} {fn!r:.60}")


@dataclass(frozen=True, slots=True)
class _Problem:
    text: str
    value: Any
    of_type: bool = False
    """Its type is wrong (TypeError), rather than its value (ValueError)."""
    checked: bool = False
    """Found by a check of the field's declaration, not by its type."""


def _problem(spec: FieldSpec, value: Any) -> _Problem | None:
    """What is wrong with a field's value, or None."""
    allowed = spec.types
    if not isinstance(value, allowed) or (type(value) is bool and bool not in allowed):
        return _Problem(f"must be {_type_name(allowed)}", value, of_type=True)
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        return _Problem("is out of range", value)
    if type(value) is float and not math.isfinite(value):
        return _Problem("must be finite", value)
    if value is not None:
        for check in spec.checks:
            problem = check.problem(value)
            if problem is not None:
                return _Problem(problem, value, checked=True)
    return None


def _argument_error(name: str, problem: _Problem) -> TypeError | ValueError:
    shown = repr(problem.value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if problem.of_type:
        return TypeError(
            f"{name} must be {_python_name(problem.text)}, not "
            f"{type(problem.value).__name__} {shown}"
        )
    if isinstance(problem.value, dict | list):
        return ValueError(f"{name} {problem.text}")
    return ValueError(f"{name} {problem.text}, not {shown}")


def _python_name(wire: str) -> str:
    """A wire type description (`float or int or null`) in Python's words."""
    names = wire.removeprefix("must be ").split(" or ")
    words = {
        "float": "a number",
        "int": "an int",
        "null": "None",
        "str": "a str",
        "dict": "a dict",
        "list": "a list",
        "bool": "True or False",
    }
    if "float" in names and "int" in names:
        names.remove("int")
    names.sort(key=lambda n: n == "null")  # None last
    return " or ".join(dict.fromkeys(words.get(n, n) for n in names))


def _bad(message: str) -> RunnerdError:
    return RunnerdError(ErrorCode.BAD_REQUEST, message)


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    """Map a field annotation to the Python types msgpack may deliver for it."""
    if typing.get_origin(annotation) is Annotated:
        return _allowed_types(annotation.__origin__)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed_types(arg))
    origin = typing.get_origin(annotation) or annotation
    if annotation is type(None):
        return (type(None),)
    if origin is float:
        return (float, int)
    return (origin,)


def _checks(annotation: Any) -> Iterable[Check]:
    """The checks in an annotation's `Annotated` metadata (inside an `X | None` too)."""
    if typing.get_origin(annotation) is Annotated:
        yield from (m for m in annotation.__metadata__ if hasattr(m, "problem"))
    for arg in typing.get_args(annotation) if _is_union(annotation) else ():
        yield from _checks(arg)


def _is_union(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union


def _type_name(allowed: tuple[type, ...]) -> str:
    return " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in allowed}))
