"""The study's grid: which categories each seed merges (the seed rule) and the cells it defines. Pure functions.

The seed rule (the paper's fairness rule: every base, size and method merges the same categories at a given
(seed, N)): order the sorted category list by sha256("<seed>:<category>") and take the first N, reported sorted.
So a seed's subsets are nested (its N=2 categories are among its N=4 ones), they depend only on (seed, N, the set of
categories), and adding a category to the study can change a seed's subsets (the ordering is over the set).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mergescale.study.config import MULTITASK_LABEL, StudyConfig, size_value


def seed_order(seed: int, categories: list[str]) -> list[str]:
    """The seed's order of the categories: by sha256 of '<seed>:<category>' (ties impossible in practice)."""
    return sorted(sorted(set(categories)), key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())


def categories_for(seed: int, n: int, categories: list[str]) -> tuple[str, ...]:
    """The N categories a cell of this seed merges, sorted: the seed rule (module docstring)."""
    cats = sorted(set(categories))
    if not 1 <= n <= len(cats):
        raise ValueError(f"cannot pick {n} of {len(cats)} categories")
    return tuple(sorted(seed_order(seed, cats)[:n]))


@dataclass(frozen=True)
class Cell:
    """One merge of the grid: a base's experts of `categories`, merged with the method labelled `method`."""

    base: str
    kind: str
    size: str
    method: str  # the method's label
    method_name: str  # the merge method (average, ties, ...)
    n_experts: int
    seed: int
    categories: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.base}/{self.method}/N={self.n_experts}/seed={self.seed}"


def cells(config: StudyConfig, held_in: list[str]) -> list[Cell]:
    """Every cell of the grid, ordered base (by size, then name), N, seed, method: cells of small N come first,
    so a partial study fills whole columns of the tables early."""
    out = []
    bases = sorted(config.bases, key=lambda b: (size_value(b.size), b.name))
    for b in bases:
        for n in config.num_experts:
            for seed in config.seeds:
                cats = categories_for(seed, n, held_in)
                for m in config.methods:
                    out.append(Cell(b.name, b.kind, b.size, m.label, m.method, n, seed, cats))
    return out


def multitask_cells(config: StudyConfig, held_in: list[str]) -> list[Cell]:
    """The multitask baseline's pseudo-cells: one per (base with a multitask model, N, seed), scored on the same
    held-in subset as that (N, seed)'s merges (so its held-in row varies with N, as in the paper's tables)."""
    out = []
    for b in sorted(config.bases, key=lambda b: (size_value(b.size), b.name)):
        if b.name not in config.multitask:
            continue
        for n in config.num_experts:
            for seed in config.seeds:
                out.append(Cell(b.name, b.kind, b.size, MULTITASK_LABEL, "multitask", n, seed,
                                categories_for(seed, n, held_in)))
    return out
