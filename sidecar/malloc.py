"""Keep glibc from mmap-ing the relay's short-lived large buffers.

The TLS layer reads into a 256 KiB buffer and shrinks it to what arrived; above glibc's
default 128 KiB mmap threshold every such read is an mmap, an mremap and a munmap (measured:
three syscalls per TLS read, a fifth of the sidecar's syscall time). Raising the threshold
serves them from the heap instead. A no-op where glibc's ``mallopt`` is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold_bytes: int = 4 << 20, trim_threshold_bytes: int = 16 << 20) -> bool:
    """Raise the mmap and trim thresholds; True when glibc accepted both."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes))
