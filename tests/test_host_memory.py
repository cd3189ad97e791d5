"""keep_freed_memory: glibc's mallopt is applied on Linux/glibc, and the environment variable turns it off.

Each case runs in a fresh interpreter, so this test process's allocator is left as it was."""

import os
import subprocess
import sys

import pytest

PROBE = ("import ctypes, sys; from rlhfkit.host_memory import keep_freed_memory; applied = keep_freed_memory(); "
         # A 64 MB block: served by mmap by default; with M_MMAP_MAX = 0 it comes from the heap (brk), so the
         # program break moves by at least its size.
         "sbrk = ctypes.CDLL(None).sbrk; sbrk.restype = ctypes.c_void_p; sbrk.argtypes = [ctypes.c_long]; "
         "before = sbrk(0); block = bytearray(64 * 2**20); grown = sbrk(0) - before; "
         "print(applied, grown >= 64 * 2**20)")


def _probe(**env) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env={**os.environ, **env}, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc only")
def test_large_blocks_come_from_the_heap_once_applied():
    assert _probe() == "True True"


def test_the_environment_variable_turns_it_off():
    assert _probe(RLHFKIT_KEEP_FREED_MEMORY="0") == "False False"
