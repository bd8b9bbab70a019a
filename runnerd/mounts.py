"""Which filesystem holds a path: the registry refuses a network filesystem.

SQLite's WAL keeps its index in a memory-mapped `-shm` file that every connection shares;
over NFS, SMB, sshfs and cluster filesystems that mapping is not coherent between
machines (and often not locked), so the registry would corrupt. `os.statvfs` does not
report the type, so the type comes from `/proc/self/mountinfo`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "9p",
        "afs",
        "fuse.sshfs",
        "sshfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "fuse.ceph",
        "fuse.ceph-fuse",
        "glusterfs",
        "fuse.glusterfs",
        "gfs2",
        "ocfs2",
        "pvfs2",
        "orangefs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "davfs",
        "fuse.davfs2",
    }
)

_OCTAL = re.compile(r"\\([0-7]{3})")


def read_mountinfo() -> str:
    """This process's mount table, or "" where there is none to read (not Linux)."""
    try:
        return MOUNTINFO.read_text()
    except OSError:
        return ""


def mount_of(path: str, mountinfo: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding the absolute `path`.

    The longest mount point that is a whole-component prefix wins; of mounts stacked on the
    same point, the last one listed is the one visible.
    """
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, fstype = left.split(), right.split()[:1]
        if not sep or len(fields) < 5 or not fstype:
            continue
        point = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4])
        inside = point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype[0])
    return best


def network_mount(folder: Path, mountinfo: str) -> tuple[str, str] | None:
    """(mount point, type) if `folder` (symlinks resolved) sits on a network filesystem."""
    found = mount_of(os.path.realpath(folder), mountinfo)
    return found if found is not None and found[1] in NETWORK_FILESYSTEMS else None
