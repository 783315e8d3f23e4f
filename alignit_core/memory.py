"""Give the memory a finished request freed back to the system.

glibc's malloc keeps freed heap pages for reuse, in one arena per thread that allocates (up to eight
per core); a server whose worker threads take turns at generations (activations, decoded images,
heat-map drawings, PNG buffers) grows to the sum of their peaks and stays there. `malloc_trim(0)`
hands the free pages of every arena back, and fewer arenas leave less to fragment. Other C libraries
(musl, macOS, Windows) have neither call, and there these functions do nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_ARENA_MAX = -8  # glibc's malloc.h


@cache
def _libc(name: str):
    """The C library's function `name`, or None where there is none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_memory() -> bool:
    """Return the C heap's free pages to the system; True when there was a malloc_trim to call."""
    trim = _libc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def limit_arenas(count: int) -> bool:
    """Let malloc keep at most `count` arenas from now on, however many threads allocate (call it
    before the threads start); True when the C library took the setting."""
    mallopt = _libc("mallopt")
    return mallopt is not None and mallopt(M_ARENA_MAX, count) == 1
