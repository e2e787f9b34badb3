"""Keep the process's memory close to what it holds: glibc's ``malloc`` serves blocks below a threshold
from heaps it rarely gives back, and raises that threshold (up to 32 MiB) each time a larger block is
freed, so that the per-batch buffers of a long streaming job (a few MiB each) end up in heaps that
fragment; the peak RSS of ``vitdecomp analyze`` then varied between identical runs by up to 2x.
:func:`return_large_blocks` fixes the threshold: blocks of :data:`MMAP_THRESHOLD` and more are mapped
from the operating system and returned to it when freed (docs/scale.md, "Memory with N").
"""

from __future__ import annotations

import ctypes
import os
import sys

#: Blocks from this size up are mapped and returned on free (glibc's ``M_MMAP_THRESHOLD``). 8 MiB: the
#: default analysis' peak RSS at 1e4 images 1,341 MiB against 1,579 MiB, for the same CPU time (1 MiB
#: lowered it further but cost 39 % more CPU time in page faults).
MMAP_THRESHOLD = 8 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to ``threshold`` bytes for the rest of the process (not where the
    user set ``MALLOC_MMAP_THRESHOLD_``, nor off glibc); whether it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
