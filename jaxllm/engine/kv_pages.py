"""Host-side allocator for the device KV page pool: a free list and per-page ref counts.

The device pool itself is one array owned by the runner; this class only decides which page ids a
sequence owns. Ref counts let n > 1 siblings (and, later, prefix caching) share full pages.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got num_pages={num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.ref_counts = np.zeros(num_pages, np.int32)
        self._free = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        if num_pages > len(self._free):
            raise RuntimeError(f"KV pool exhausted: asked {num_pages} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(num_pages)]
        self.ref_counts[pages] = 1
        return pages

    def share(self, pages: list[int]) -> list[int]:
        """Another owner for already-allocated pages (n > 1 siblings share the prompt's full pages)."""
        for p in pages:
            assert self.ref_counts[p] > 0, f"sharing free page {p}"
            self.ref_counts[p] += 1
        return list(pages)

    def free(self, pages: list[int]) -> None:
        for p in pages:
            assert self.ref_counts[p] > 0, f"double free of page {p}"
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                self._free.append(p)
