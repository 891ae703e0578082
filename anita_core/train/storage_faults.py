"""A full disk, met anywhere a run writes, ends the run with one line, not a traceback.

Each of a run's writers (checkpoints and their ``latest`` pointer, metrics.jsonl,
the final adapter, the merged export, the DPO reference store, the run lock)
runs inside ``disk_full_guard``, which turns the error of a full file system
(ENOSPC) or a spent quota (EDQUOT) into ``DiskFull``: an OSError that says what
was being written, where, and how many bytes it needed when that is known. The
error arrives in two spellings: Python's OSError (its errno), and safetensors'
SafetensorError, whose message carries the Rust io::Error text, e.g. "No space
left on device (os error 28)" (the number is the platform's errno).

The writers are atomic (a temp file or folder, renamed into place only once
complete) and remove their temp files when a write fails, so a full disk leaves
every complete file as it was: the earlier checkpoints, the adapter, the
metrics lines already written (a line cut short is cut off again,
run_folder.append_metrics). ``disk_full_message`` is the line the scripts
print (run_checkpoint.exit_on_disk_full, which names the last complete checkpoint);
they exit with EXIT_DISK_FULL.
"""
from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from safetensors import SafetensorError

from anita_core.cli.common import EXIT_DISK_FULL  # noqa: F401  (the scripts' exit code)

# errno -> how the message names it
DISK_FULL_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def disk_full_errno(error: BaseException) -> Optional[int]:
    """ENOSPC or EDQUOT if ``error`` is a write that failed for lack of space, else None."""
    if isinstance(error, OSError):
        code = error.errno
    elif isinstance(error, SafetensorError):
        match = _RUST_OS_ERROR.search(str(error))
        code = int(match[1]) if match else None
    else:
        return None
    return code if code in DISK_FULL_ERRNOS else None


class DiskFull(OSError):
    """A write of the run failed because its file system is full (or the quota spent)."""

    def __init__(self, what: str, path, needed: Optional[int], code: int):
        super().__init__(code, os.strerror(code), str(path))
        self.what, self.path, self.needed = what, Path(path), needed


@contextmanager
def disk_full_guard(what: str, path, needed: Optional[int] = None) -> Iterator[None]:
    """Inside: a full disk raises DiskFull(what, path, needed); any other error
    passes unchanged. ``what`` names the thing ("checkpoint", "metrics", ...),
    ``path`` where it goes, ``needed`` its size in bytes when known."""
    try:
        yield
    except DiskFull:
        raise
    except (OSError, SafetensorError) as e:
        code = disk_full_errno(e)
        if code is None:
            raise
        raise DiskFull(what, path, needed, code) from e


def free_bytes(path) -> Optional[int]:
    """Bytes an unprivileged write may still use on the file system of ``path``
    (of its nearest existing parent); None when that cannot be asked."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        stat = os.statvfs(where)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def readable_size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"


def disk_full_message(error: DiskFull, last_checkpoint: Optional[Path]) -> str:
    """The one line a run that met a full disk ends with (after the writer removed
    its partial files, so the free space it states is what is left)."""
    sizes = []
    if error.needed:
        sizes.append(f"needs ~{readable_size(error.needed)}")
    free = free_bytes(error.path) if error.errno == errno.ENOSPC else None
    if free is not None:
        sizes.append(f"{readable_size(free)} free there")
    sizes_text = f" ({'; '.join(sizes)})" if sizes else ""
    if last_checkpoint is not None:
        last = f"last complete checkpoint: {last_checkpoint}; free some space, then continue with --resume"
    else:
        last = "last complete checkpoint: none; free some space, then run again"
    return (f"error: {DISK_FULL_ERRNOS[error.errno]} writing {error.what} {error.path}{sizes_text}: "
            f"{error.strerror}. Its partial files were removed and nothing complete was touched; "
            f"{last}")
