"""Attention key/value caches for continuous batching and prefix reuse.

The running batch keeps one `transformers` DynamicCache whose rows are left-padded to a common
length; a mask marks the real positions. Rows join (padding the shorter side on the left) and leave
(row selection, then trimming columns that only padding uses) between decoding steps. Cached
tensors are never modified in place, so a prefix stored here can be shared by many requests.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

# Per layer: (keys, values), each (B, heads, L, head_dim).
LayerKV = tuple[torch.Tensor, torch.Tensor]


def forward_with_cache(llm: torch.nn.Module, cache: DynamicCache, **inputs) -> tuple[object, DynamicCache]:
    """One LLM forward that reads and returns a KV cache.

    Recent `transformers` releases call the argument and the output field `cache` and warn on
    `past_key_values`; earlier 5.x releases only know `past_key_values`.
    """
    if _forward_takes_cache(type(llm)):
        output = llm(cache=cache, use_cache=True, **inputs)
        return output, output.cache
    output = llm(past_key_values=cache, use_cache=True, **inputs)
    return output, output.past_key_values


@functools.cache
def _forward_takes_cache(model_class: type) -> bool:
    """Read once per model class, not on every decoding step."""
    return "cache" in inspect.signature(model_class.forward).parameters


def cache_from_layers(layers: list[LayerKV]) -> DynamicCache:
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def cache_layers(cache: DynamicCache) -> list[LayerKV]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_length(layers: list[LayerKV]) -> int:
    return layers[0][0].shape[2] if layers else 0


def left_pad(layers: list[LayerKV], length: int) -> list[LayerKV]:
    """Pad every layer on the left along time to `length` positions."""
    extra = length - cache_length(layers)
    if extra == 0:
        return layers
    # (B, heads, L, d) -> (B, heads, extra + L, d)
    return [(F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in layers]


@dataclass
class RunningBatch:
    """The rows being decoded: their shared cache and which positions of it are real."""

    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (B, L) long

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, layers: list[LayerKV]) -> None:
        """Append one row (batch size 1, no padding) to the batch."""
        if self.cache is None:
            self.cache = cache_from_layers(layers)
            self.mask = torch.ones(1, cache_length(layers), dtype=torch.long, device=layers[0][0].device)
            return
        current = cache_layers(self.cache)
        real = cache_length(layers)
        length = max(cache_length(current), real)
        current, layers = left_pad(current, length), left_pad(layers, length)
        merged = [
            (torch.cat([k0, k1]), torch.cat([v0, v1]))
            for (k0, v0), (k1, v1) in zip(current, layers, strict=True)
        ]
        row_mask = torch.zeros(1, length, dtype=torch.long, device=self.mask.device)
        row_mask[:, length - real :] = 1
        mask = torch.cat([F.pad(self.mask, (length - self.mask.shape[1], 0)), row_mask])
        # Both built before either is replaced: a failure here leaves the batch as it was.
        self.cache, self.mask = cache_from_layers(merged), mask

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, then drop leading columns that no remaining row uses."""
        if not rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        first_used = int(mask.any(0).nonzero()[0])
        layers = [(k[index, :, first_used:], v[index, :, first_used:]) for k, v in cache_layers(self.cache)]
        self.cache, self.mask = cache_from_layers(layers), mask[:, first_used:]

    def row_layers(self, row: int) -> list[LayerKV]:
        """One row's keys and values without its padding (batch size 1)."""
        start = int(self.mask[row].nonzero()[0])
        return [
            (k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in cache_layers(self.cache)
        ]


class PrefixCache:
    """Bounded LRU of keys/values of earlier prompts, found again by longest common prefix.

    Entries are keyed by a list of position keys (token ids, or one media hash per media block
    covering that block's rows), so a follow-up question about the same video skips the video's rows.
    A salt (vLLM's `cache_salt`) partitions the entries between callers who must not share them.
    """

    def __init__(self, max_bytes: int = 1024**3):
        self.max_bytes = max_bytes
        # entry id -> (salt, key, cache positions per key element, layers)
        self._entries: OrderedDict[int, tuple[str | None, list, list[int], list[LayerKV]]] = OrderedDict()
        self._bytes = 0
        self._next = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.reused_tokens = 0

    @staticmethod
    def _nbytes(layers: list[LayerKV]) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)

    def put(self, key: list, block_rows: list[int], layers: list[LayerKV], salt: str | None = None) -> None:
        """Store keys/values; `block_rows[i]` is how many cache positions key element i covers.

        Entries of different salts never cover, replace or serve each other.
        """
        size = self._nbytes(layers)
        if size > self.max_bytes or not key:
            return
        with self._lock:
            for entry_id, (old_salt, old_key, _, _) in list(self._entries.items()):
                if old_salt != salt:
                    continue
                if old_key[: len(key)] == key:
                    return  # a longer or equal entry already covers it
                if key[: len(old_key)] == old_key:
                    self._bytes -= self._nbytes(self._entries.pop(entry_id)[3])
            self._entries[self._next] = (salt, list(key), list(block_rows), layers)
            self._next += 1
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, _, _, old) = self._entries.popitem(last=False)
                self._bytes -= self._nbytes(old)

    def longest(self, key: list, max_rows: int, salt: str | None = None) -> tuple[int, list[LayerKV] | None]:
        """The longest stored prefix of `key` under the same salt, as (rows, layers cropped to those rows).

        At most `max_rows`. Only entries stored with an equal salt (None with None) are searched, so
        the count returned never tells one salt's callers what another's asked.
        """
        best_rows, best = 0, None
        with self._lock:
            for entry_id, (stored_salt, stored, rows_of, layers) in self._entries.items():
                if stored_salt != salt:
                    continue
                rows = 0
                for a, b, r in zip(stored, key, rows_of, strict=False):
                    if a != b or rows + r > max_rows:
                        break
                    rows += r
                if rows > best_rows:
                    best_rows, best = rows, (entry_id, layers)
            if best is None:
                return 0, None
            self._entries.move_to_end(best[0])
            self.hits += 1
            self.reused_tokens += best_rows
        return best_rows, [(k[:, :, :best_rows], v[:, :, :best_rows]) for k, v in best[1]]
