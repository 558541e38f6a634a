"""Honest statistics for a few seeds: mean and spread over seeds, paired differences per seed, and a
bootstrap interval of each difference that counts both sources of noise.

Two arms trained with the same seed share their data order and initialisation where their recipes
allow, and are scored on the same held-out questions, so they are compared seed by seed. The 95%
interval of a difference resamples at two levels (a hierarchical bootstrap): the seeds, with
replacement, then, within each drawn seed, the questions, with replacement and the same draw for
both arms (a question is scored for both or for neither). With 3 seeds the seed level has little to
draw from; the interval is then mostly the questions' noise, and the spread of the per-seed
differences (reported beside it) is the better guide to training noise.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); None where there are too few values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Difference:
    """Arm A minus arm B on one cell (a modality and a question type, or a total), in accuracy."""

    cell: str
    seeds: list[int]
    per_seed: list[float]  # A - B at each seed
    mean: float
    std: float | None  # of the per-seed differences
    low: float | None  # 95% bootstrap interval of the mean difference
    high: float | None
    questions: int  # per seed
    a_wins: int  # seeds where A scored higher
    b_wins: int

    @property
    def verdict(self) -> str:
        """'A' or 'B' when the interval excludes zero on that side, else 'none'."""
        if self.low is None or self.high is None:
            return "none"
        if self.low > 0:
            return "A"
        if self.high < 0:
            return "B"
        return "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"verdict": self.verdict}


def bootstrap_mean_difference(
    correct_a: list[np.ndarray], correct_b: list[np.ndarray], resamples: int, seed: int
) -> tuple[float, float]:
    """95% percentile interval of the mean (over seeds) of A's minus B's accuracy.

    `correct_a[s]` and `correct_b[s]` are 0/1 arrays over the same questions, in the same order,
    for seed s. Each resample draws seeds with replacement and, for every draw, the questions
    with replacement. Resampling questions only changes how many questions of each paired outcome
    (A right B wrong: +1; both alike: 0; A wrong B right: -1) are drawn, so each draw is one
    multinomial over those three counts: exact, and cheap.
    """
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError("one pair of 0/1 arrays per seed")
    rng = np.random.default_rng(seed)
    k = len(correct_a)
    picks = rng.integers(0, k, size=(resamples, k))  # (R, k): the seed in each slot
    drawn = np.zeros((resamples, k))
    for s, (a, b) in enumerate(zip(correct_a, correct_b, strict=True)):
        if a.shape != b.shape or a.size == 0:
            raise ValueError(f"seed {s}: the arms' questions differ or are none")
        d = a.astype(np.int64) - b.astype(np.int64)
        n = d.size
        p = np.array([(d == 1).sum(), (d == 0).sum(), (d == -1).sum()], dtype=np.float64) / n
        counts = rng.multinomial(n, p, size=(resamples, k))  # (R, k, 3): a fresh draw for every slot
        diffs = (counts[..., 0] - counts[..., 2]) / n  # (R, k)
        drawn = np.where(picks == s, diffs, drawn)
    means = drawn.mean(axis=1)  # (R,)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def cell_seed(cell: str, a: str, b: str) -> int:
    """A fixed bootstrap seed per comparison and cell, so a report is rebuilt to the same digits."""
    return zlib.crc32(f"{a}|{b}|{cell}".encode())


def paired_difference(
    cell: str,
    a: str,
    b: str,
    correct_a: dict[int, np.ndarray],
    correct_b: dict[int, np.ndarray],
    resamples: int = 10000,
) -> Difference | None:
    """A - B on one cell over the seeds both arms have; None if they share no seed."""
    seeds = sorted(set(correct_a) & set(correct_b))
    if not seeds:
        return None
    per_seed = [float(correct_a[s].mean() - correct_b[s].mean()) for s in seeds]
    mean, std = mean_std(per_seed)
    assert mean is not None
    low, high = bootstrap_mean_difference(
        [correct_a[s] for s in seeds], [correct_b[s] for s in seeds], resamples, cell_seed(cell, a, b)
    )
    return Difference(
        cell=cell,
        seeds=seeds,
        per_seed=per_seed,
        mean=mean,
        std=std,
        low=low,
        high=high,
        questions=int(correct_a[seeds[0]].size),
        a_wins=sum(d > 0 for d in per_seed),
        b_wins=sum(d < 0 for d in per_seed),
    )
