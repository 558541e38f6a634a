"""Batch samplers: an epoch's global batches (shuffled together, or grouped by modality and length),
each rank's share of them, cut into the micro-batches of gradient accumulation.

Every order is a function of (seed, epoch) alone, so any number of processes, and a run resumed at
a step, see the batches one process would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Sampler

from videollava.data.records import MODALITIES


def _generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def mixed_batches(
    n: int, batch_size: int, seed: int, epoch: int, groups: Sequence[str | None] | None = None
) -> list[list[int]]:
    """Everything shuffled together, cut into global batches (the last may be smaller).

    With ``groups``, the members of a group move as one unit and share a batch (a batch closes
    early rather than split one), so a contrastive loss always sees them side by side.
    """
    if groups is None or all(g is None for g in groups):
        order = torch.randperm(n, generator=_generator(seed, epoch)).tolist()
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    members: dict[str, list[int]] = {}
    units: list[list[int]] = []
    for index, group in enumerate(groups):
        if group is None:
            units.append([index])
        elif group in members:
            members[group].append(index)
        else:
            members[group] = [index]
            units.append(members[group])
    batches: list[list[int]] = [[]]
    for u in torch.randperm(len(units), generator=_generator(seed, epoch)).tolist():
        unit = units[u]
        if batches[-1] and len(batches[-1]) + len(unit) > batch_size:
            batches.append([])
        for start in range(0, len(unit), batch_size):  # a group larger than a batch is cut
            if batches[-1] and start:
                batches.append([])
            batches[-1].extend(unit[start : start + batch_size])
    return [b for b in batches if b]


def grouped_batches(
    lengths: Sequence[int], modalities: Sequence[str], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of one modality and similar length, in shuffled order.

    Per modality: shuffle, cut into megabatches of one global batch, sort each by length (longest
    first, so the micro-batches of a rank hold like-sized samples). The incomplete megabatches of all
    modalities are pooled into trailing batches; the full ones are shuffled.
    """
    g = _generator(seed, epoch)
    full: list[list[int]] = []
    leftovers: list[int] = []
    for modality in MODALITIES:
        members = [i for i, m in enumerate(modalities) if m == modality]
        if not members:
            continue
        shuffled = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        for start in range(0, len(shuffled), batch_size):
            chunk = sorted(shuffled[start : start + batch_size], key=lambda i: -lengths[i])
            if len(chunk) == batch_size:
                full.append(chunk)
            else:
                leftovers.extend(chunk)
    order = torch.randperm(len(full), generator=g).tolist()
    batches = [full[j] for j in order]
    leftovers.sort(key=lambda i: -lengths[i])
    batches += [leftovers[i : i + batch_size] for i in range(0, len(leftovers), batch_size)]
    return batches


def global_batches(
    mode: str,
    lengths: Sequence[int],
    modalities: Sequence[str],
    batch_size: int,
    seed: int,
    epoch: int,
    groups: Sequence[str | None] | None = None,
) -> list[list[int]]:
    """One epoch's global batches; the same for any number of processes."""
    if mode == "mixed":
        return mixed_batches(len(lengths), batch_size, seed, epoch, groups)
    if mode == "grouped":
        return grouped_batches(lengths, modalities, batch_size, seed, epoch)
    raise ValueError(f"unknown sampler mode {mode!r}; expected 'mixed' or 'grouped'")


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch; shares differ in size by at most one."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return list(batch[start : start + base + (1 if rank < extra else 0)])


def micro_batches(indices: Sequence[int], micro_batch_size: int, accumulation: int) -> list[list[int]]:
    """Exactly `accumulation` micro-batches (trailing ones may be empty) so every rank steps together."""
    pieces = [list(indices[i : i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]
    if len(pieces) > accumulation:
        raise ValueError(
            f"{len(indices)} samples do not fit {accumulation} micro-batches of {micro_batch_size}"
        )
    return pieces + [[] for _ in range(accumulation - len(pieces))]


@dataclass
class StepBatches(Sampler[list[int]]):
    """This rank's micro-batches for one epoch, `accumulation` per global batch, after a resume point.

    Deterministic for (seed, epoch); the union over ranks of each step's micro-batches is the global
    batch a single process would train on.
    """

    mode: str
    lengths: Sequence[int]
    modalities: Sequence[str]
    batch_size: int
    micro_batch_size: int
    accumulation: int
    seed: int
    epoch: int = 0
    start: int = 0
    rank: int = 0
    world_size: int = 1
    # Order this rank's share by length before cutting micro-batches: less padding. Only for losses
    # that are sums over samples (LM), where the grouping into micro-batches does not change the result.
    sort_by_length: bool = False
    groups: Sequence[str | None] | None = None
    _batches: list[list[int]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._batches = global_batches(
            self.mode, self.lengths, self.modalities, self.batch_size, self.seed, self.epoch, self.groups
        )

    @property
    def batches(self) -> list[list[int]]:
        return self._batches

    def steps(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches[self.start :]:
            indices = shard(batch, self.rank, self.world_size)
            if self.sort_by_length:
                indices.sort(key=lambda i: -self.lengths[i])
            yield from micro_batches(indices, self.micro_batch_size, self.accumulation)

    def __len__(self) -> int:
        return (len(self._batches) - self.start) * self.accumulation
