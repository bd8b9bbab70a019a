"""Control characters made visible: a value read from a file or a folder's name (a newline,
an ESC sequence, a bidi override) must not forge a log line or drive the user's terminal.

`escape_controls` is the one place that decides what is shown escaped; the daemon's log
(`EscapeControls`, a logging filter) and runnerctl's human output both use it. JSON output
is never escaped: it stays exact.
"""

from __future__ import annotations

import logging
import re

# C0, DEL and C1 controls; the Unicode line and paragraph separators (splitlines breaks on
# them); and the bidi embeddings, overrides and isolates that reorder what is shown.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTINUED = "  "


def _escaped(char: str) -> str:
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str, keep: str = "") -> str:
    """`text` with every control character written as an escape (\\n, \\x1b, \\u202e),
    except those in `keep` (say "\\n\\t" for a multi-line block)."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: m[0] if m[0] in keep else _escaped(m[0]), text)


def continued(block: str) -> str:
    """A multi-line block (a traceback) for a log: controls escaped but newlines, and every
    line after the first indented, so none can pass for a record of its own."""
    first, *rest = escape_controls(block, keep="\n").split("\n")
    return "\n".join([first, *(_CONTINUED + line for line in rest)])


class EscapeControls(logging.Filter):
    """Makes each log record one line of its own: the message with control characters
    escaped; a traceback or stack below it indented (installed on the daemon's handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "controls_escaped", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken record: the formatter reports it itself
            return True
        record.msg, record.args = escape_controls(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _CONTINUED + continued(record.exc_text)
        if record.stack_info:
            record.stack_info = _CONTINUED + continued(record.stack_info)
        record.controls_escaped = True
        return True
