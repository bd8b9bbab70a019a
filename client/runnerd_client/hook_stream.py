"""An integration's hook in either of runnerd's hook modes: one event on stdin and an exit
status (`mode = "call"`), or, kept running (`mode = "stream"`, which runnerd says with
RUNNERD_HOOK_MODE=stream), one event per stdin line and one acknowledgement per event on
stdout, so the tool is imported once for all events instead of once per event.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from runnerd_client.integration import HookInput, read_hook_input, run_hook

MODE_ENV = "RUNNERD_HOOK_MODE"


def streaming() -> bool:
    return os.environ.get(MODE_ENV) == "stream"


def hook(prog: str, handle: Callable[[HookInput], None], warm: Callable[[], None]) -> int:
    """Serve runnerd's hook in the mode it runs it in; a stream imports the tool (`warm`)
    before it reads the first event, while no event waits for it."""
    if not streaming():
        return run_hook(prog, handle)
    warm()
    return serve(prog, handle, sys.stdin, _acknowledgements())


def _acknowledgements() -> TextIO:
    """A stream for the acknowledgements alone: stdout's file; stdout itself (fd 1 and
    sys.stdout) now goes to stderr, so nothing a tool prints passes for an answer."""
    sys.stdout.flush()
    acks = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return acks


def serve(prog: str, handle: Callable[[HookInput], None], lines: TextIO, acks: TextIO) -> int:
    """Answer each event line until runnerd closes the stream (exit 0)."""
    for line in lines:
        if line.strip():
            acks.write(json.dumps(answer(prog, handle, line)) + "\n")
            acks.flush()
    return 0


def answer(prog: str, handle: Callable[[HookInput], None], line: str) -> dict[str, Any]:
    """Handle one event line: `{"ok": true, "seq": N}`, or `"ok": false` with the error
    (also printed to stderr), after which runnerd sends the event again later."""
    seq = None
    try:
        event = read_hook_input(io.StringIO(line))
        seq = event.event.get("seq")
        handle(event)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"{prog} hook: {error}", file=sys.stderr, flush=True)
        return (
            {"ok": False, "error": error}
            if seq is None
            else {"ok": False, "seq": seq, "error": error}
        )
    return {"ok": True} if seq is None else {"ok": True, "seq": seq}
