"""Give the memory a finished request freed back to the system.

glibc's malloc keeps freed heap pages for reuse, in one arena per thread that ever allocated; a
server whose worker threads take turns at generations (activations, decoded images, heat-map
drawings, PNG buffers) grows to the sum of their peaks and stays there. `malloc_trim(0)` hands the
free pages of every arena back. Other C libraries (musl, macOS, Windows) have no malloc_trim, and
there this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> bool:
    """Return the C heap's free pages to the system; True when there was a malloc_trim to call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
