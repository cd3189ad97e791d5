"""How the process's C allocator (glibc malloc) treats the large tensors of a training step on a CPU.

glibc serves each allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and returns it to the
kernel with `munmap` when freed; it also gives the top of its heap back once more than the trim threshold is
free. A training step allocates and frees the same large tensors again and again (the 49152 x 576 embedding
gradient, chunks of logits, autocast's bf16 copies of the weights, gradient casts), and every one of them then
starts as untouched pages that the kernel maps and zeroes one 4 KiB page fault at a time: filling a fresh 113 MB
embedding gradient took 38 ms on the 2-core reference machine, almost all of it in page faults, against a few
ms for memory the process already holds.

`keep_freed_memory()` asks glibc to serve large blocks from its heap and to keep freed memory for reuse
(`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 2 GiB)`), which is what PyTorch's CPU performance guide
gets by preloading jemalloc or tcmalloc. The command line calls it before any work; a Python user may call it
too. It changes nothing on other C libraries or platforms, and `RLHFKIT_KEEP_FREED_MEMORY=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # an int; free heap top above this still goes back to the kernel


def keep_freed_memory() -> bool:
    """Tune glibc malloc for repeated large tensors; returns True if it was applied."""
    if os.environ.get("RLHFKIT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
    # glibc only (musl's mallopt is a no-op stub).
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
