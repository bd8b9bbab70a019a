"""A foreign run folder's params: notata's params.yaml or params.json, or a config.json,
beside its metadata.json.

notata writes params.yaml with PyYAML's `yaml.dump`: block mappings and lists of plain,
numeric or quoted scalars. `simple_yaml` reads that subset and nothing more, without a
YAML dependency: anchors, tags, flow collections, multi-line and block scalars are
refused (ValueError), never guessed at, so a file it reads means what PyYAML reads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

PARAMS_FILES = ("params.yaml", "params.yml", "params.json", "config.json")
_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"([-+]?[0-9]+\.[0-9]*|\.[0-9]+)([eE][-+][0-9]+)?")
_SPECIAL = ("&", "*", "!", "|", ">", "%", "@", "`", "{", "[", "]", "}", ",", "?", "#")
_WORDS: dict[str, Any] = {
    **dict.fromkeys(("true", "True", "TRUE"), True),
    **dict.fromkeys(("false", "False", "FALSE"), False),
    **dict.fromkeys(("null", "Null", "NULL", "~"), None),
}
_OTHER_YAML = ("yes", "no", "on", "off", ".inf", "+.inf", "-.inf", ".nan", "=", "<<")
_LINE = tuple[int, str, int]  # indent, text, line number


def simple_yaml(text: str) -> dict[str, Any]:
    """The mapping a params.yaml of the subset above says (ValueError naming the line for
    anything else)."""
    lines: list[_LINE] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#") or stripped in ("---", "..."):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {number}: a tab in the indentation")
        lines.append((len(raw) - len(raw.lstrip(" ")), stripped, number))
    if not lines:
        return {}
    value, end = _block(lines, 0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"line {lines[end][2]}: indented unlike the lines before it")
    if not isinstance(value, dict):
        raise ValueError("not a mapping of names to values")
    return value


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _block(lines: list[_LINE], at: int, indent: int) -> tuple[Any, int]:
    """The list or mapping whose lines start at `at` with this indent, and where it ends."""
    if _is_item(lines[at][1]):
        items = []
        while at < len(lines) and lines[at][0] == indent and _is_item(lines[at][1]):
            _, text, number = lines[at]
            item = text[1:].strip()
            if not item or _split(item) is not None:
                raise ValueError(f"line {number}: only lists of plain values are read")
            items.append(_scalar(item, number))
            at += 1
        return items, at
    mapping: dict[str, Any] = {}
    while at < len(lines) and lines[at][0] == indent and not _is_item(lines[at][1]):
        _, text, number = lines[at]
        pair = _split(text)
        if pair is None:
            raise ValueError(f"line {number}: not 'name: value'")
        key, rest = _scalar(pair[0], number), pair[1]
        if not isinstance(key, str):
            raise ValueError(f"line {number}: a name that is not a text")
        if key in mapping:
            raise ValueError(f"line {number}: {key!r} given twice")
        at += 1
        if rest:
            mapping[key] = _scalar(rest, number)
        elif at < len(lines) and (
            lines[at][0] > indent or (lines[at][0] == indent and _is_item(lines[at][1]))
        ):
            mapping[key], at = _block(lines, at, lines[at][0])
        else:
            mapping[key] = None
    return mapping, at


def _split(text: str) -> tuple[str, str] | None:
    """A line's (name, value) when it is `name: value` or `name:`, the name plain or quoted."""
    if text[0] in "'\"":
        close = _closing_quote(text)
        if close is None or not text[close + 1 :].startswith(":"):
            return None
        after = text[close + 2 :]
        return (text[: close + 1], after.strip()) if not after or after[0] == " " else None
    if text.endswith(":"):
        return text[:-1].rstrip(), ""
    key, sep, value = text.partition(": ")
    return (key.rstrip(), value.strip()) if sep else None


def _closing_quote(text: str) -> int | None:
    quote, at = text[0], 1
    while at < len(text):
        if quote == '"' and text[at] == "\\":
            at += 2
            continue
        if text[at] == quote:
            if quote == "'" and text[at + 1 : at + 2] == "'":
                at += 2
                continue
            return at
        at += 1
    return None


def _scalar(text: str, number: int) -> Any:
    """One value as PyYAML's safe loader reads it, for the plain forms yaml.dump writes."""
    if text[0] in "'\"":
        if _closing_quote(text) != len(text) - 1:
            raise ValueError(f"line {number}: a quoted value that does not end on its line")
        if text[0] == "'":
            return text[1:-1].replace("''", "'")
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"line {number}: an escape in quotes that is not JSON's") from None
        return value
    if text in ("{}", "[]"):
        return {} if text == "{}" else []
    if (
        text.startswith(_SPECIAL)
        or text == "-"
        or text.startswith("- ")
        or " #" in text
        or ": " in text
        or text.endswith(":")
    ):
        raise ValueError(f"line {number}: {text[:40]!r} is not a plain value")
    if text in _WORDS:
        return _WORDS[text]
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if text.lower() in _WORDS or text.lower() in _OTHER_YAML or re.match(r"[-+.]?[0-9]", text):
        raise ValueError(f"line {number}: {text!r} means something else to YAML 1.1")
    return text


def parse_params(name: str, data: bytes) -> dict[str, Any]:
    """A params file's mapping (ValueError saying why not), by its name: YAML or JSON."""
    text = data.decode()
    value = simple_yaml(text) if name.endswith((".yaml", ".yml")) else json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"not an object but {type(value).__name__}")
    return value


def params_file(folder: str) -> str | None:
    """The params file beside a metadata.json, the first of PARAMS_FILES there."""
    return next(
        (
            os.path.join(folder, name)
            for name in PARAMS_FILES
            if os.path.isfile(os.path.join(folder, name))
        ),
        None,
    )
