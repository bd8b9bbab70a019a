"""runnerd's command line: settings and logging, then the daemon (runnerd.daemon)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import anyio
import click

from runnerd import __version__, config
from runnerd.controls import EscapeControls
from runnerd.daemon import StartupError, serve
from runnerd_client.protocol import RunnerdError

log = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    """Under systemd, `<N>` priority prefixes and no timestamps (journald adds its own).
    Every record is one line: a path or a value with a newline or ESC cannot forge one."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EscapeControls())
    if "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ:
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority, as sd-daemon(3) describes."""

    PRIORITIES = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="Unix socket.")
@click.option("--db", type=click.Path(path_type=Path), help="SQLite registry file.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.toml.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
@click.option(
    "--mirror",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the records in this shared folder too (NFS, Lustre, GPFS).",
)
@click.version_option(__version__, prog_name="runnerd")
def main(
    socket_path: Path | None,
    db: Path | None,
    config_path: Path | None,
    log_level: str,
    check_config: bool,
    mirror: Path | None,
) -> None:
    """Run the runnerd daemon in the foreground."""
    setup_logging(log_level)
    try:
        cfg = config.load(
            config_path, socket=socket_path, db=db, mirror=mirror.absolute() if mirror else None
        )
        if check_config:
            click.echo(f"configuration is valid: socket {cfg.socket}, registry {cfg.db}")
            return
        anyio.run(serve, cfg)
    except (config.ConfigError, StartupError, RunnerdError, OSError) as exc:
        log.error("%s", exc)
        sys.exit(1)
