"""Huge pages for a CPU session's weights: which memory is advised, and that the advice takes."""

from __future__ import annotations

import mmap
import platform
import re
import sys
import warnings

import numpy as np
import pytest

from softprompt.runtime import hugepages
from softprompt.runtime.hugepages import HUGE_PAGE, Mapping, anonymous_mappings, new_ranges

MB = 1 << 20

SMAPS = """\
55f42e529000-55f42e52b000 r--p 00000000 fe:00 260386                     /usr/bin/python3
Rss:                   8 kB
560000000000-560000400000 rw-p 00000000 00:00 0                          [heap]
Rss:                4096 kB
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Rss:               65536 kB
AnonHugePages:         0 kB
7f0010000000-7f0010200000 rw-p 00000000 fe:00 1234                       /tmp/weights.bin
Rss:                2048 kB
7f0020000000-7f0020200000 r--p 00000000 00:00 0 
Rss:                2048 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                 132 kB
"""


def test_only_private_writable_anonymous_memory_and_the_heap_are_read():
    assert anonymous_mappings(SMAPS) == [
        Mapping(0x560000000000, 0x560000400000, 4 * MB),
        Mapping(0x7F0000000000, 0x7F0004000000, 64 * MB),
    ]


def test_new_ranges_leave_out_old_memory_and_round_inwards_to_huge_pages():
    base = 0x7F0000000000
    before = [Mapping(base, base + 8 * MB, 8 * MB)]
    # The mapping grew downwards by 8 MiB + 1 page and upwards by 3 MiB: the old part stays out, and
    # each new part shrinks to whole huge pages (the odd page below, the last 1 MiB above).
    after = [Mapping(base - 8 * MB - 4096, base + 11 * MB, 19 * MB + 4096)]
    assert new_ranges(before, after) == [(base - 8 * MB, base), (base + 8 * MB, base + 10 * MB)]
    assert all(start % HUGE_PAGE == 0 and end % HUGE_PAGE == 0 for start, end in new_ranges(before, after))


def test_memory_that_is_mostly_not_resident_is_not_advised():
    """Advising it would let later faults fill whole huge pages: the process would grow."""
    after = [Mapping(0x7F0000000000, 0x7F0000000000 + 64 * MB, 32 * MB)]
    assert new_ranges([], after) == []


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_HUGE_PAGES", "0")
    assert hugepages.read_mappings() is None
    assert hugepages.advise_new_memory(None) == 0


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            header = hugepages._HEADER.match(line)
            if header:
                inside = int(header.group(1), 16) <= address < int(header.group(2), 16)
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


def test_memory_that_appears_between_the_two_calls_ends_on_huge_pages():
    if sys.platform != "linux":
        pytest.skip("transparent huge pages are a Linux feature")
    before = hugepages.read_mappings()
    if before is None:
        pytest.skip("transparent huge pages are set to 'never' on this machine")
    # Mapped directly: NumPy would advise an array this large itself.
    memory = mmap.mmap(-1, 64 * MB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    weights = np.frombuffer(memory, np.float32)
    weights[:] = 1.0  # touched: resident, like prepacked weights
    advised = hugepages.advise_new_memory(before, wait=True)
    assert advised >= 60 * MB
    kernel = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    if kernel < (6, 1):
        pytest.skip(f"Linux {platform.release()} has no MADV_COLLAPSE (6.1+): khugepaged collapses the memory later")
    assert _huge_bytes_at(weights.ctypes.data) >= 60 * MB
    assert float(weights.sum()) == weights.size  # the contents survive the collapse


@pytest.mark.parametrize("runs_on, advised", [(["CPUExecutionProvider"], True),
                                              (["CUDAExecutionProvider", "CPUExecutionProvider"], False)])
def test_a_session_that_runs_on_the_cpu_has_its_new_memory_advised(monkeypatch, llama_export, runs_on, advised):
    """Whatever was asked for: a CUDA request that fell back to the CPU reads its weights from host memory too."""
    from softprompt.runtime import session as session_module

    class Session:
        def __init__(self, path, options, providers):
            pass

        def get_providers(self):
            return runs_on

    calls = []
    monkeypatch.setattr(session_module.ort, "InferenceSession", Session)
    monkeypatch.setattr(session_module, "read_mappings", lambda: "before")
    monkeypatch.setattr(session_module, "advise_new_memory", calls.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CUDA fallback's warning, tested in test_runtime
        session_module.create_session(llama_export / "model.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert calls == (["before"] if advised else [])
