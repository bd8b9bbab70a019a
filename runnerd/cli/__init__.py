"""runnerctl: thin click commands over the client connection (SPEC §6), one module per area.

Imports stay light (no daemon modules, no SQLite) so `runnerctl status` starts fast.
"""

from runnerd.cli import (  # noqa: F401  (they register commands)
    admin,
    failures,
    following,
    hooks,
    launching,
    runs,
    stack,
    status,
    sweeps,
)
from runnerd.cli.common import cli, parse_duration, parse_size

__all__ = ["cli", "main", "parse_duration", "parse_size"]


def main() -> None:
    cli()
