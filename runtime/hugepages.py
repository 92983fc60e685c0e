"""Transparent huge pages for the weights onnxruntime holds in memory (Linux).

Why: a CPU decode step at batch 1 streams every weight once (540 MB for SmolLM2-135M). On 4 KiB
pages that is 130,000 pages a step, each a TLB miss and, in a virtual machine, a two-level page
walk; on 2 MiB pages it is 270. Most distributions set transparent huge pages to `madvise`, so
memory gets them only when a program asks: PyTorch (THP_MEM_ALLOC_ENABLE), NumPy (arrays of 4 MiB
and more) and llama.cpp ask, onnxruntime does not. So the runtime asks for it: the anonymous
memory that appeared while a session was created (the weights and their prepacked copies) is
advised MADV_HUGEPAGE and collapsed with MADV_COLLAPSE (Linux 6.1 and later; on older kernels the
kernel's khugepaged collapses it later). Collapsing copies the memory, about a second for SmolLM2
on a 2-core KVM guest, so it runs in a background thread: loading does not wait, and steps run
at the old speed until it is done. Measured there: decode steps 2% faster, interleaved with those
of an unadvised session in one process.

Only memory that is nearly all resident is advised, so nothing grows by more than a few pages;
everything here is advice, and any refusal (THP set to `never`, another OS, an old kernel) leaves
the memory as it was. `SOFTPROMPT_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from typing import NamedTuple

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
MOSTLY_RESIDENT = 0.9  # share of a mapping's pages that must be in memory before it is advised
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


class Mapping(NamedTuple):
    start: int
    end: int
    resident: int  # bytes


def anonymous_mappings(smaps: str) -> list[Mapping]:
    """The private writable anonymous mappings (the heap included) of a /proc/PID/smaps text."""
    found: list[Mapping] = []
    current: list | None = None
    for line in smaps.splitlines():
        header = _HEADER.match(line)
        if header:
            start, end, perms, path = header.groups()
            current = [int(start, 16), int(end, 16), 0] if perms == "rw-p" and path in ("", "[heap]") else None
            if current is not None:
                found.append(current)  # type: ignore[arg-type]
        elif current is not None and line.startswith("Rss:"):
            current[2] = int(line.split()[1]) * 1024
    return [Mapping(*m) for m in found]


def new_ranges(before: list[Mapping], after: list[Mapping]) -> list[tuple[int, int]]:
    """Huge-page-aligned ranges of the mostly resident mappings in `after` that `before` did not cover."""
    old = sorted((m.start, m.end) for m in before)
    ranges = []
    for mapping in after:
        if mapping.resident < MOSTLY_RESIDENT * (mapping.end - mapping.start):
            continue
        pieces = [(mapping.start, mapping.end)]
        for lo, hi in old:
            pieces = [part for start, end in pieces
                      for part in ((start, min(end, lo)), (max(start, hi), end)) if part[0] < part[1]]
        for start, end in pieces:
            start, end = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
            if end > start:
                ranges.append((start, end))
    return ranges


def read_mappings() -> list[Mapping] | None:
    """This process's anonymous mappings, or None where huge pages are not to be asked for
    (switched off, not Linux, transparent huge pages set to `never`)."""
    if sys.platform != "linux" or os.environ.get("SOFTPROMPT_HUGE_PAGES", "1") == "0":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode:
            if "[never]" in mode.read():
                return None
        with open("/proc/self/smaps") as smaps:
            return anonymous_mappings(smaps.read())
    except OSError:
        return None


def advise_new_memory(before: list[Mapping] | None, wait: bool = False) -> int:
    """Advise the memory that appeared since `before` (from `read_mappings`) and collapse it, in a
    background thread unless `wait`; returns the bytes advised."""
    if before is None:
        return 0
    after = read_mappings()
    if after is None:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = [(start, end) for start, end in new_ranges(before, after)
               if libc.madvise(start, end - start, MADV_HUGEPAGE) == 0]
    if advised:
        collapse = threading.Thread(target=_collapse, args=(libc, advised), name="softprompt-huge-pages", daemon=True)
        collapse.start()
        if wait:
            collapse.join()
    return sum(end - start for start, end in advised)


def _collapse(libc, ranges: list[tuple[int, int]]) -> None:
    for start, end in ranges:  # ctypes lets go of the GIL for the call; refused before Linux 6.1
        libc.madvise(start, end - start, MADV_COLLAPSE)
