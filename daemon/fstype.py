"""Which kind of file system a folder is on, from statfs(2)'s `f_type` (Linux; elsewhere every folder is local).

It matters twice. inotify reports only what this kernel does: on network file systems (NFS, SMB/CIFS, Ceph,
9p, ...) and FUSE (sshfs, bindfs, rclone, ...) another machine's or the backing store's writes send no event,
so such roots are polled. SQLite's WAL and locking need a local file system, so the state dir is refused there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

#: `f_type` magic numbers (linux/magic.h, and the file systems' own headers) of file systems whose content
#: can change without this kernel seeing it.
REMOTE: dict[int, str] = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x564C: "ncp",
    0x73757245: "coda",
    0x5346414F: "afs",
    0x6B414653: "kafs",
    0x00C36400: "ceph",
    0x01021997: "9p",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x19830326: "beegfs",
    0xAAD7AAEA: "panfs",
    0x786F4256: "vboxsf",
    0x65735546: "fuse",
}


@dataclass(frozen=True)
class FileSystem:
    """`name` is the remote kind, or `local` (any other magic, shown in hex for the log)."""

    name: str
    magic: int

    @property
    def remote(self) -> bool:
        return self.magic in REMOTE


class _StatFs(ctypes.Structure):
    # struct statfs begins with `__fsword_t f_type` (a long) on every Linux ABI Python runs on; the rest of the
    # structure is room for the kernel to write into, never read.
    _fields_ = (("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256))


def _libc_statfs() -> ctypes._NamedFuncPointer | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    function = libc.statfs
    function.argtypes = (ctypes.c_char_p, ctypes.POINTER(_StatFs))
    function.restype = ctypes.c_int
    return function


_STATFS = _libc_statfs()


def file_system(path: Path) -> FileSystem:
    """The file system `path` is on. Raises OSError (e.g. ENOENT) when statfs(2) fails."""
    if _STATFS is None:
        return FileSystem("local", 0)
    buffer = _StatFs()
    if _STATFS(os.fsencode(path), ctypes.byref(buffer)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), str(path))
    magic = buffer.f_type & 0xFFFFFFFF
    return FileSystem(REMOTE.get(magic, f"local ({magic:#x})"), magic)
