"""Keep host memory at "one tensor in flight" while reading a checkpoint.

safetensors' ``safe_open`` maps the whole shard file and ``get_tensor`` returns
views of that map. Every page we read stays resident (and counted in our RSS)
until the file is closed, so reading a 5 GB shard tensor by tensor would still
end with ~5 GB of its pages resident. After a tensor has been consumed
(quantized, or copied into memory of our own) we tell the kernel we no longer
need its pages (``madvise(MADV_DONTNEED)``): they are clean file pages, so
dropping them loses nothing, and a later read simply faults them in again.

Also: ``return_freed_heap_to_os`` (glibc malloc_trim) after each tensor.

Safety: only address ranges that /proc/self/maps shows as mappings *of that
very file* are ever advised, so heap memory can never be touched. Anything
unexpected (not Linux, no /proc, no libc, a tensor outside the map) turns the
release into a no-op: correctness never depends on it, only memory does.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

_MADV_DONTNEED = 4  # Linux value (asm-generic/mman-common.h)
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    return _madvise


def _mappings_of(path: Path) -> List[Tuple[int, int]]:
    """[start, end) address ranges at which ``path`` is mapped into this process."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


class MappedPageReleaser:
    """Drops the resident pages of consumed tensors of one open shard file.
    Create it while the file is open (inside the ``safe_open`` block)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._ranges: Optional[List[Tuple[int, int]]] = None

    def release(self, t: torch.Tensor) -> None:
        madvise = _libc_madvise()
        if not madvise or t.device.type != "cpu" or t.numel() == 0:
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if self._ranges is None:
            self._ranges = _mappings_of(self.path)  # the map exists once get_tensor ran
        page = mmap.PAGESIZE
        for lo_map, hi_map in self._ranges:
            if lo_map <= start and end <= hi_map:
                # Whole pages; a page shared with a neighbouring tensor is just
                # read again from the file if that neighbour is still to come.
                lo = max(lo_map, start // page * page)
                hi = min(hi_map, -(-end // page) * page)
                madvise(lo, hi - lo, _MADV_DONTNEED)
                return


_malloc_trim = None


def return_freed_heap_to_os() -> None:
    """glibc keeps freed heap memory mapped for reuse; the temporaries of each
    quantization (the Triton interpreter's NumPy arrays, on CPU) pile up to
    ~100 MB of resident memory nobody uses over a shard (measured with
    bench/load_memory.py). malloc_trim hands it back to the OS in
    milliseconds. Best effort: a no-op where there is no glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _malloc_trim:
        _malloc_trim(0)
