"""Host-side owner of the device KV page pool: allocation, sharing, and automatic prefix caching.

The device pool itself is one array owned by the runner; this class only decides which page ids a
sequence owns. Ref counts let n > 1 siblings and prefix-cache hits share pages.

Prefix caching (vLLM V1's scheme): a full page is named by a hash chain, hash(parent hash, its token
ids, extra keys such as a cache salt), so equal hashes mean equal prefixes. A page whose last owner
frees it keeps its hash and stays valid in an LRU of evictable pages; allocation takes never-hashed
pages first and then evicts the least recently freed one. A hit is found by walking a sequence's hash
chain until the first miss.

Beyond vLLM: the partly filled last page a sequence leaves behind (a chat's reply ends mid-page, and the
next turn resends it) is kept too, as a tail named by the chain before it and holding the tokens whose
K/V it has. A later sequence continuing that chain with the same first tokens claims the page and
writes its own tokens after them, instead of recomputing up to a page of tokens per turn.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np


def page_hash(parent: bytes | None, token_ids, extra: bytes = b"") -> bytes:
    """The chained identity of one full page. 128-bit blake2b: a collision would silently serve
    another prompt's K/V, so no 64-bit Python hash here."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(np.asarray(token_ids, np.int64).tobytes())
    h.update(extra)
    return h.digest()


def tail_key(parent: bytes | None, extra: bytes = b"") -> bytes:
    """Where a partly filled page sits: after the chain `parent` (None: at the start), under the same
    extra keys. No full page's hash equals it (a full page hashes at least one token)."""
    return page_hash(parent, (), extra)


class PagePool:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got num_pages={num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = np.zeros(num_pages, np.int32)
        self._free: deque[int] = deque(range(num_pages))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed or a tail; oldest first
        self._page_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._tails: dict[bytes, dict[int, tuple[int, ...]]] = {}  # tail key -> {page: its tokens}
        self._tail_key_of: dict[int, bytes] = {}
        self.queries = 0  # prefix-cache lookups, in tokens (vLLM's vllm:prefix_cache_queries)
        self.hits = 0  # of which found cached

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: never-hashed free pages plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_free(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= self.num_free

    def allocate(self, num_pages: int) -> list[int]:
        if num_pages > self.num_free:
            raise RuntimeError(f"KV pool exhausted: asked {num_pages} pages, {self.num_free} free")
        pages = []
        for _ in range(num_pages):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                if page in self._hash_of:
                    del self._page_of[self._hash_of.pop(page)]
                else:
                    self._forget_tail(page)
            pages.append(page)
        self.ref_counts[pages] = 1
        return pages

    def share(self, pages: list[int]) -> list[int]:
        """Another owner for pages in use (n > 1 siblings share the prompt's full pages)."""
        for p in pages:
            assert self.ref_counts[p] > 0, f"sharing free page {p}"
            self.ref_counts[p] += 1
        return list(pages)

    def free(self, pages: list[int]) -> None:
        # Tail pages first, so that eviction (oldest first) takes chain ends before their prefixes.
        for p in reversed(pages):
            assert self.ref_counts[p] > 0, f"double free of page {p}"
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                if p in self._hash_of or p in self._tail_key_of:
                    self._evictable[p] = None
                else:
                    self._free.append(p)

    # ---- prefix caching ---------------------------------------------------------------------------

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Pages holding the longest cached prefix of the chain `hashes`; takes a reference on each."""
        pages = []
        if self.enable_prefix_caching:
            for h in hashes:
                page = self._page_of.get(h)
                if page is None:
                    break
                pages.append(page)
        for p in pages:
            if self.ref_counts[p] == 0:
                del self._evictable[p]
            self.ref_counts[p] += 1
        return pages

    def record_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.queries += queried_tokens
        self.hits += hit_tokens

    def register(self, page: int, page_hash_: bytes) -> None:
        """Names a page whose tokens are now all computed. A second page with the same content (two
        requests prefilled the same prefix at once) stays anonymous; the first keeps the name."""
        if not self.enable_prefix_caching or page in self._hash_of or page_hash_ in self._page_of:
            return
        self._hash_of[page] = page_hash_
        self._page_of[page_hash_] = page

    def register_tail(self, page: int, key: bytes, tokens: list[int]) -> None:
        """Keeps a partly filled page its last owner is about to free: its first len(tokens) slots hold
        those tokens' K/V after the chain `key` names (tail_key)."""
        if (not self.enable_prefix_caching or not tokens or self.ref_counts[page] != 1 or page in self._hash_of
                or page in self._tail_key_of):
            return
        self._tails.setdefault(key, {})[page] = tuple(tokens)
        self._tail_key_of[page] = key

    def claim_tail(self, key: bytes, tokens: list[int]) -> tuple[int, int] | None:
        """The kept tail after chain `key` sharing the most leading tokens with `tokens`, taken over
        whole: (page, tokens it already holds), or None. The page leaves the cache (its new owner
        overwrites the slots after those tokens), so no two owners ever write one page."""
        best, best_n = None, 0
        for page, held in self._tails.get(key, {}).items():
            n = 0
            for a, b in zip(held, tokens):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = page, n
        if best is None:
            return None
        self._forget_tail(best)
        del self._evictable[best]
        self.ref_counts[best] = 1
        return best, best_n

    def _forget_tail(self, page: int) -> None:
        key = self._tail_key_of.pop(page)
        tails = self._tails[key]
        del tails[page]
        if not tails:
            del self._tails[key]

    def reset_prefix_cache(self) -> int:
        """Forgets every hash and tail (pages in use keep their contents and owners). Returns pages
        dropped."""
        dropped = len(self._hash_of) + len(self._tail_key_of)
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._page_of.clear()
        self._hash_of.clear()
        self._tails.clear()
        self._tail_key_of.clear()
        return dropped

    def reset(self) -> None:
        """Everything free and unnamed (after the device pool was rebuilt: its contents are gone)."""
        self.reset_prefix_cache()
        self.ref_counts[:] = 0
        self._free = deque(range(self.num_pages))

    def check(self) -> None:
        """Invariants (tests): each page is exactly one of in use / free / cached-evictable."""
        in_use = set(np.flatnonzero(self.ref_counts > 0).tolist())
        free, cached = set(self._free), set(self._evictable)
        assert not (in_use & free) and not (in_use & cached) and not (free & cached)
        assert len(in_use) + len(free) + len(cached) == self.num_pages
        assert len(self._free) == len(free)
        assert all((p in self._hash_of) != (p in self._tail_key_of) for p in cached)
        assert all(p in cached for p in self._tail_key_of)  # a kept tail has no owner
        assert all(self._page_of[h] == p for p, h in self._hash_of.items())
        assert all(p in self._tails[k] for p, k in self._tail_key_of.items())
        assert sum(map(len, self._tails.values())) == len(self._tail_key_of)
