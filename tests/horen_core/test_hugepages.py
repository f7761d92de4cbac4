"""Huge pages for large host tensors: asked for where the kernel offers them, contents untouched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from horen_core import hugepages
from horen_core.codebook import Codebook

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs Linux with transparent huge pages not disabled",
)
pytestmark = needs_thp


def huge_bytes(t: torch.Tensor) -> int:
    """AnonHugePages of the mappings that overlap ``t``'s storage (/proc/self/smaps)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and end > lo
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


def collapse_supported() -> bool:
    """Whether this kernel moves written memory onto huge pages on request (MADV_COLLAPSE, Linux 6.1)."""
    return hugepages.advise_tensor(torch.ones(32 << 20 >> 2), collapse=True)


def test_a_written_tensor_collapses_onto_huge_pages_unchanged():
    if not collapse_supported():
        pytest.skip("kernel without MADV_COLLAPSE")
    t = torch.randn(64 << 20 >> 2)  # 64 MB, written on 4 KB pages
    before = t.clone()
    assert hugepages.advise_tensor(t, collapse=True)
    assert huge_bytes(t) >= 32 << 20
    assert torch.equal(t, before)


def test_small_and_device_tensors_are_left_alone():
    assert not hugepages.advise_tensor(torch.zeros(1024))
    assert not hugepages.advise_tensor(torch.zeros(64 << 20 >> 2)[::2])  # not contiguous


def test_a_large_codebook_keeps_its_keys_on_huge_pages():
    cb = Codebook(4096, 8)
    cb.reserve(4096)  # 64 MB of keys, advised before their first write
    assert huge_bytes(cb._rows.key_buf) >= 32 << 20
    assert float(cb._rows.key_buf.abs().sum()) == 0.0
