"""How the process takes memory from the operating system: freed memory kept for the next allocation.

A training step allocates and frees the same large tensors every step (an 18-member MLP's weight gradients,
7 MB each in bf16; a CNN group's activations, up to 28 MB). glibc's malloc as it comes hands memory freed at the
top of its heap back to the kernel once more than a few MB are free there (its trim threshold follows the blocks
freed, up to 64 MB), so a tensor allocated again gets fresh pages: a page fault and a page of zeros for every
4 kB it touches, at ~4 GB/s in this VM. One weight gradient's product took 5.3 ms on fresh pages, 1.9 ms on
reused ones. ``tune_allocator`` has glibc keep them (``mallopt``: blocks up to 32 MB, its largest mmap
threshold, come from the heap, and the heap is not trimmed). Only where memory comes from changes, never a
value: the numbers are the same bits.

Measured on this project's 2-core Xeon (18 members, bf16, idle): the MLP's step alone 57 ms as it comes, 46 ms
kept; a CNN fit's step 0.53–0.62 s as it comes, 0.50 s kept (peak memory 2.66 and 2.88 GB). Torch's transparent
huge pages (``THP_MEM_ALLOC_ENABLE=1``) took the MLP's step to 42 ms, but the CNN's to 0.53–0.56 s with both
settings (peak memory 4.3 GB) and 0.66 s alone: not set. ``NOISE_ROBUSTNESS_ALLOCATOR=default`` leaves malloc as
it comes (the reference, for the benchmark's comparison), and so does a ``MALLOC_*`` or ``GLIBC_TUNABLES``
setting of the user's.
"""

import ctypes
import ctypes.util
import os
import sys

SWITCH = "NOISE_ROBUSTNESS_ALLOCATOR"  # "default": malloc as it comes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
LARGEST_MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on a 64-bit machine


def tune_allocator() -> bool:
    """Has glibc's malloc keep freed memory for reuse, unless ``NOISE_ROBUSTNESS_ALLOCATOR=default`` or a malloc
    setting in the environment says otherwise; whether it did (not off Linux, nor on a C library without
    ``mallopt``, such as musl). Process-wide, from the next allocation on."""
    if os.environ.get(SWITCH) == "default":
        return False
    if any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in os.environ):
        return False  # the user tuned malloc: theirs stands
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallopt", None)
    except OSError:  # no C library found by name
        return False
    if mallopt is None or mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) != 1:
        return False
    return mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1  # never trimmed: the process keeps its peak
