"""Attention key/value storage for continuous batching, and the prefix cache.

The running batch keeps its keys and values in preallocated buffers, one pair per layer, each
(row capacity, kv heads, column capacity, head dim), with a (row capacity, column capacity) mask of
the cells that hold real positions. Rows 0..B-1 are the running rows, left-padded in a window of
columns [start, end) they share: a decoding step writes every row's new keys and values at column
`end`, in place, through `WindowCache` (a transformers `Cache` whose layers write into the buffers
and hand attention views of them). Padding cells inside the window are zeros, never stale data.

What is copied, and when (a "cell" is one row's keys and values at one position, in every layer):

- a decoding step writes only its new column, and counts only once it succeeds: a failed step's
  column is simply not counted, so there is nothing to undo;
- growth: when a step needs a column past the buffers, or a joining row a slot past the row
  capacity, the window's cells are copied once into new buffers: twice as many columns (or, when the
  window fills at most half of them, as many, the window moved to the left) and twice as many rows.
  Geometric growth makes this O(1) cells per position on average;
- a row joins: its reused prefix is copied from the prefix cache into a free row slot, and its
  prefill writes the rest there directly. A row longer than the window extends the window to the
  left into spare columns (the other rows' new padding is zeroed), or with one reallocation;
- a row leaves: the last row moves into its slot (that row's cells are copied), or nothing moves
  when it was the last row; leading columns no row uses any more are dropped by moving `start`;
- a finished row (or a prompt just prefilled) is copied out when the prefix cache stores it: its
  entries are immutable, shared by every request that reuses them, and must not alias the buffers.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# Per layer: (keys, values), each (B, heads, L, head_dim).
LayerKV = tuple[torch.Tensor, torch.Tensor]

# Columns of a new batch's buffers at least: short prompts should not reallocate every few steps.
MIN_COLUMNS = 64


def forward_with_cache(llm: torch.nn.Module, cache: Cache, **inputs) -> object:
    """One LLM forward that reads and writes a KV cache; returns the model's output.

    Recent `transformers` releases call the argument `cache` and warn on `past_key_values`; earlier
    5.x releases only know `past_key_values`.
    """
    if _forward_takes_cache(type(llm)):
        return llm(cache=cache, use_cache=True, **inputs)
    return llm(past_key_values=cache, use_cache=True, **inputs)


@functools.cache
def _forward_takes_cache(model_class: type) -> bool:
    """Read once per model class, not on every decoding step."""
    return "cache" in inspect.signature(model_class.forward).parameters


@dataclass(frozen=True)
class KVLayout:
    """What the buffers hold: one (keys, values) pair per layer, of `heads` x `head_dim` per position."""

    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, llm: torch.nn.Module, device: torch.device) -> KVLayout:
        """From a transformers LLM's config; keys and values take the dtype of its embeddings (which
        stay in the compute dtype when linear layers are quantised)."""
        config = llm.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = llm.get_input_embeddings().weight.dtype
        return cls(config.num_hidden_layers, heads, head_dim, dtype, torch.device(device))


@dataclass
class CopyCounts:
    """Cells (one row at one position, every layer's keys and values) copied so far, by cause."""

    grow: int = 0  # reallocations (and moves of the window to the left)
    join: int = 0  # reused prefixes written into a joining row
    leave: int = 0  # last rows moved into the slot of a row that left

    def total(self) -> int:
        return self.grow + self.join + self.leave


class _WindowLayer(CacheLayerMixin):
    """One layer's view of a window of the batch's buffers: `rows` x columns [column, column + filled)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, batch: RunningBatch, index: int, rows: slice, column: int, filled: int):
        super().__init__()
        self._batch, self._index, self._rows = batch, index, rows
        self._column, self._filled = column, filled
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The buffers exist before any forward: nothing to initialise."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (rows, heads, q, d) new keys/values after the filled columns; return views of all of them."""
        keys, values = self._batch.keys[self._index], self._batch.values[self._index]
        at = self._column + self._filled
        end = at + key_states.shape[-2]
        if end > keys.shape[2]:
            raise RuntimeError(f"KV window overflow: column {end} past the buffers' {keys.shape[2]}")
        keys[self._rows, :, at:end].copy_(key_states)
        values[self._rows, :, at:end].copy_(value_states)
        self._filled = end - self._column
        self.keys = keys[self._rows, :, self._column : end]
        self.values = values[self._rows, :, self._column : end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._filled

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._filled + query_length, 0

    def get_max_length(self) -> int:
        return -1


class WindowCache(Cache):
    """A transformers Cache over rows [rows.start, rows.stop) of a RunningBatch's buffers: a forward
    writes its new keys/values after `filled` positions from `column`, in place."""

    def __init__(self, batch: RunningBatch, rows: slice, column: int, filled: int):
        layers = [_WindowLayer(batch, i, rows, column, filled) for i in range(batch.layout.layers)]
        super().__init__(layers=layers)


@dataclass
class _Joining:
    slot: int
    length: int  # positions the row will hold, ending at the window's end


class RunningBatch:
    """The rows being decoded: keys and values in place in growing buffers, and which cells are real.

    `max_rows` and `max_columns` bound growth (the engine's batch size, the model's context + 1).
    """

    def __init__(self, layout: KVLayout, max_rows: int | None = None, max_columns: int | None = None):
        self.layout = layout
        self.max_rows = max_rows
        self.max_columns = max_columns
        self.keys: list[torch.Tensor] = []  # per layer (R, heads, T, d)
        self.values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None  # (R, T) bool: the cell holds a real position
        self.size = 0  # running rows: 0..size-1
        self.start = 0  # the window's columns: [start, end)
        self.end = 0
        self.copies = CopyCounts()
        self._joining: _Joining | None = None

    # ------------------------------------------------------------ shape

    @property
    def row_capacity(self) -> int:
        return 0 if self._mask is None else self._mask.shape[0]

    @property
    def column_capacity(self) -> int:
        return 0 if self._mask is None else self._mask.shape[1]

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def mask(self) -> torch.Tensor | None:
        """(B, L) bool: the running rows' real positions in the window."""
        return None if self.size == 0 else self._mask[: self.size, self.start : self.end]

    def clear(self) -> None:
        """Drop every row and the buffers (an engine fault left their state unknown)."""
        self.keys, self.values, self._mask = [], [], None
        self.size = self.start = self.end = 0
        self._joining = None

    def _fit(self, rows: int, first: int, last: int) -> None:
        """Make rows 0..rows-1 and columns [first, last) (absolute; `first` may be negative and `last`
        past the capacity) exist, keeping the running rows' window; reallocate if they do not.

        On reallocation the window's cells are copied into new buffers, placed with a quarter of the
        spare columns on the left, and `start`/`end` move with them. Columns from `first` up to the
        old start are not initialised here. Never called while a row is joining but for `reserve`.
        """
        if rows <= self.row_capacity and first >= 0 and last <= self.column_capacity:
            return
        length = last - first
        row_capacity = max(self.row_capacity, 1)
        while row_capacity < rows:
            row_capacity *= 2
        if self.max_rows is not None:
            row_capacity = max(rows, min(row_capacity, self.max_rows))
        columns = max(self.column_capacity, MIN_COLUMNS)
        while columns < 2 * length:  # at least half the columns spare after the move
            columns *= 2
        if self.max_columns is not None:
            columns = max(length, min(columns, self.max_columns))
        shift = (columns - length) // 4 - first  # old column c -> new column c + shift
        layout = self.layout
        shape = (row_capacity, layout.heads, columns, layout.head_dim)
        keys = [torch.empty(shape, dtype=layout.dtype, device=layout.device) for _ in range(layout.layers)]
        values = [torch.empty(shape, dtype=layout.dtype, device=layout.device) for _ in range(layout.layers)]
        mask = torch.zeros(row_capacity, columns, dtype=torch.bool, device=layout.device)
        if self.size:
            old, new = slice(self.start, self.end), slice(self.start + shift, self.end + shift)
            for target, source in zip(keys + values, self.keys + self.values, strict=True):
                target[: self.size, :, new] = source[: self.size, :, old]
            mask[: self.size, new] = self._mask[: self.size, old]
            self.copies.grow += self.size * self.length
        self.keys, self.values, self._mask = keys, values, mask
        self.start += shift
        self.end += shift

    def _extend_left(self, first: int) -> None:
        """Move `start` left to `first` (already inside the buffers): the running rows' new cells are padding."""
        if first >= self.start:
            return
        if self.size:
            for buffer in self.keys + self.values:
                buffer[: self.size, :, first : self.start].zero_()
            self._mask[: self.size, first : self.start] = False
        self.start = first

    # ------------------------------------------------------------ joining

    def reserve(self, length: int) -> int:
        """Make room for a row of `length` positions ending at the window's end; return its slot.

        The row is written by `write_prefix` and a prefill through `joining_cache`, then counted by
        `admit` (or forgotten by `abort`).
        """
        if self._joining is not None:
            raise RuntimeError("a row is already joining")
        if self.size == 0:
            self.start = self.end = max(self.end, length)  # an empty batch places its window freely
        # the next decoding step's column too, so that joining and stepping reallocate at most once
        self._fit(self.size + 1, min(self.start, self.end - length), self.end + 1)
        if self.size == 0:
            self.start = self.end - length
        else:
            self._extend_left(self.end - length)
        self._joining = _Joining(self.size, length)
        return self.size

    def write_prefix(self, layers: list[LayerKV]) -> None:
        """Copy reused keys/values (batch size 1, P positions) into the joining row's first P positions."""
        joining = self._require_joining()
        at = self.end - joining.length
        reused = layers[0][0].shape[2]
        rows = slice(joining.slot, joining.slot + 1)
        for keys, values, (k, v) in zip(self.keys, self.values, layers, strict=True):
            keys[rows, :, at : at + reused].copy_(k)
            values[rows, :, at : at + reused].copy_(v)
        self.copies.join += reused

    def joining_cache(self, filled: int) -> WindowCache:
        """The joining row's cache, its first `filled` positions written: a prefill writes the rest in place."""
        joining = self._require_joining()
        slot = joining.slot
        return WindowCache(self, slice(slot, slot + 1), self.end - joining.length, filled)

    def joining_layers(self, positions: int) -> list[LayerKV]:
        """Views of the joining row's first `positions` positions (batch size 1)."""
        joining = self._require_joining()
        at, rows = self.end - joining.length, slice(joining.slot, joining.slot + 1)
        return [
            (k[rows, :, at : at + positions], v[rows, :, at : at + positions])
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def admit(self) -> None:
        """Count the joining row as running: its padding cells become zeros, its real ones real."""
        joining = self._require_joining()
        slot, first_real = joining.slot, self.end - joining.length
        for buffer in self.keys + self.values:
            buffer[slot, :, self.start : first_real].zero_()
        self._mask[slot, self.start : first_real] = False
        self._mask[slot, first_real : self.end] = True
        self.size += 1
        self._joining = None

    def abort(self) -> None:
        """Forget a joining row (its prefill failed): the running rows are as they were."""
        self._joining = None
        self._trim()

    def _require_joining(self) -> _Joining:
        if self._joining is None:
            raise RuntimeError("no row is joining: call reserve first")
        return self._joining

    # ------------------------------------------------------------ decoding

    def step_mask(self) -> torch.Tensor:
        """(B, L + 1) bool mask of a decoding step over every running row, its new column included.

        Makes sure the new column exists; the step counts only once `commit` is called.
        """
        self._fit(self.size, self.start, self.end + 1)
        self._mask[: self.size, self.end] = True
        return self._mask[: self.size, self.start : self.end + 1]

    def step_cache(self) -> WindowCache:
        """The running rows' cache for one decoding step: it writes column `end` in place."""
        return WindowCache(self, slice(0, self.size), self.start, self.length)

    def commit(self) -> None:
        """The decoding step succeeded: its column is now part of every running row."""
        self.end += 1

    def row_start(self, row: int) -> int:
        """A running row's first real column (`end` when it holds no position yet)."""
        real = self._mask[row, self.start : self.end].nonzero()
        return self.start + int(real[0]) if len(real) else self.end

    def row_cache(self, row: int) -> tuple[WindowCache, int]:
        """(cache over one running row's real positions alone, how many they are): for stepping it alone.

        A step through it writes that row's cells at column `end`, which no step has counted yet.
        """
        start = self.row_start(row)
        return WindowCache(self, slice(row, row + 1), start, self.end - start), self.end - start

    def row_layers(self, row: int) -> list[LayerKV]:
        """Views of one running row's real positions (batch size 1); they change when the row's slot is
        reused, so copy them to keep them (the prefix cache does)."""
        start = self.row_start(row)
        return [
            (k[row : row + 1, :, start : self.end], v[row : row + 1, :, start : self.end])
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    # ------------------------------------------------------------ leaving

    def remove(self, rows: list[int]) -> list[int]:
        """Take these running rows out; return the old indices of the rows left, in their new order.

        Rows that stay and sit past the new size move into the holes below it (each copied once);
        no other row moves. Then leading columns no row uses are dropped by moving `start`.
        """
        leaving = set(rows)
        size = self.size - len(leaving)
        holes = sorted(row for row in leaving if row < size)
        movers = [row for row in range(size, self.size) if row not in leaving]
        order = list(range(size))
        window = slice(self.start, self.end)
        for hole, mover in zip(holes, movers, strict=True):
            for buffer in self.keys + self.values:
                buffer[hole, :, window] = buffer[mover, :, window]
            self._mask[hole, window] = self._mask[mover, window]
            self.copies.leave += self.length
            order[hole] = mover
        self.size = size
        if self.size == 0:
            self.clear()
        else:
            self._trim()
        return order

    def _trim(self) -> None:
        """Drop leading window columns that no running row uses (a view offset: nothing is copied)."""
        if self.size == 0:
            self.start = self.end
            return
        used = self._mask[: self.size, self.start : self.end].any(0).nonzero()
        self.start = self.start + int(used[0]) if len(used) else self.end


class PrefixCache:
    """Bounded LRU of keys/values of earlier prompts, found again by longest common prefix.

    Entries are keyed by a list of position keys (token ids, or one media hash per media block
    covering that block's rows), so a follow-up question about the same video skips the video's rows.
    A salt (vLLM's `cache_salt`) partitions the entries between callers who must not share them.
    Entries are never modified: many requests read the same one.
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
        self.copied_positions = 0  # positions copied in by `put(..., copy=True)`

    @staticmethod
    def _nbytes(layers: list[LayerKV]) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)

    def put(
        self,
        key: list,
        block_rows: list[int],
        layers: list[LayerKV],
        salt: str | None = None,
        *,
        copy: bool = False,
    ) -> bool:
        """Store keys/values; `block_rows[i]` is how many cache positions key element i covers.

        With `copy`, the layers are views of storage that will change (a running batch's buffers) and
        are copied, only when they are stored. Entries of different salts never cover, replace or
        serve each other. Returns whether the entry was stored.
        """
        size = self._nbytes(layers)
        if size > self.max_bytes or not key:
            return False
        with self._lock:
            for entry_id, (old_salt, old_key, _, _) in list(self._entries.items()):
                if old_salt != salt:
                    continue
                if old_key[: len(key)] == key:
                    return False  # a longer or equal entry already covers it
                if key[: len(old_key)] == old_key:
                    self._bytes -= self._nbytes(self._entries.pop(entry_id)[3])
            if copy:
                layers = [
                    (
                        k.clone(memory_format=torch.contiguous_format),
                        v.clone(memory_format=torch.contiguous_format),
                    )
                    for k, v in layers
                ]
                self.copied_positions += layers[0][0].shape[2] if layers else 0
            self._entries[self._next] = (salt, list(key), list(block_rows), layers)
            self._next += 1
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, _, _, old) = self._entries.popitem(last=False)
                self._bytes -= self._nbytes(old)
        return True

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
