"""`runnerctl service`: install runnerd as a systemd user service (socket-activated)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import runnerd

UNITS = ("runnerd.service", "runnerd.socket")
ENABLE = (
    ["systemctl", "--user", "daemon-reload"],
    ["systemctl", "--user", "enable", "--now", "runnerd.socket"],
)
DISABLE = (
    ["systemctl", "--user", "disable", "--now", "runnerd.socket", "runnerd.service"],
    ["systemctl", "--user", "daemon-reload"],
)


def templates() -> Path:
    """The unit templates: installed with the package, or systemd/ in a source checkout."""
    here = Path(runnerd.__file__).parent
    installed = here / "units"
    return installed if installed.is_dir() else here.parent / "systemd"


def unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "systemd" / "user"


def render(name: str) -> str:
    """A unit file with ExecStart pointing at this interpreter's runnerd."""
    text = (templates() / name).read_text()
    return text.replace("@RUNNERD@", f"{sys.executable} -m runnerd")


def user_systemd() -> bool:
    """Whether a systemd user manager is there to talk to."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    return shutil.which("systemctl") is not None and os.path.exists(f"{runtime}/systemd")


def install(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in UNITS:
        path = folder / name
        path.write_text(render(name))
        written.append(path)
    return written


def uninstall(folder: Path) -> list[Path]:
    removed = [folder / name for name in UNITS if (folder / name).exists()]
    for path in removed:
        path.unlink()
    return removed


def run_all(commands: tuple[list[str], ...]) -> bool:
    """Run systemctl commands in order; False at the first that fails."""
    return all(subprocess.run(cmd, check=False).returncode == 0 for cmd in commands)
