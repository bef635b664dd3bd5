"""What the report shows, read from a run directory: every planned (base, method, N, group) with its mean over
seeds, standard deviation, seeds done of seeds planned and bootstrap interval. Tables, figures and findings all read
this one summary, so they cannot disagree.

The planned cells come from RUN_DIR/cells.parquet when it is there (a study still running shows its missing cells as
missing), else from the ledger alone; study.yaml, when there, gives the study's name, the order of the methods,
which bases have a multitask model and whether held-out tasks are planned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from mergescale.eval.aggregate import SUMMARY_FIELDS, summarize, summary_weights
from mergescale.study import bootstrap
from mergescale.study.config import MULTITASK_LABEL, load_study_config, size_value
from mergescale.study.ledger import read_ledger

KINDS = ("instruction_tuned", "pretrained")  # the paper's order: Tables 1-2 PaLM-2-IT, Tables 3-4 PaLM-2
KIND_LABEL = {"instruction_tuned": "instruction-tuned", "pretrained": "pretrained"}
GROUPS = ("held_in", "held_out")
GROUP_LABEL = {"held_in": "held-in", "held_out": "held-out"}


@dataclass(frozen=True)
class Base:
    name: str
    kind: str
    size: str
    size_params: float


@dataclass(frozen=True)
class Stat:
    """One table cell. mean is None while no seed of it is done: missing, never 0."""

    mean: float | None
    std: float | None  # sample standard deviation over seeds; None with fewer than 2
    n_seeds: int
    n_planned: int
    ci: tuple[float, float] | None = None  # bootstrap interval of the mean over examples

    @property
    def partial(self) -> bool:
        return 0 < self.n_seeds < self.n_planned


@dataclass
class StudySummary:
    name: str
    bases: list[Base]  # ordered by size, then name
    methods: list[str]  # merge method labels in the study's order (Multitask not among them)
    ns: list[int]
    groups: list[str]
    stats: dict[tuple[str, str, int, str], Stat]  # (base, method label, N, group); absent: not planned
    status: dict[str, int] = field(default_factory=dict)  # cells.parquet status -> count
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell, error)
    n_rows: int = 0
    n_boot: int = 0

    @property
    def kinds(self) -> list[str]:
        present = {b.kind for b in self.bases}
        return [k for k in KINDS if k in present] + sorted(present - set(KINDS))

    @property
    def has_multitask(self) -> bool:
        return any(k[1] == MULTITASK_LABEL for k in self.stats)

    @property
    def rows(self) -> list[str]:
        """Table rows: the methods, then Multitask when the study has one."""
        return self.methods + ([MULTITASK_LABEL] if self.has_multitask else [])

    def bases_of(self, kind: str) -> list[Base]:
        return [b for b in self.bases if b.kind == kind]

    def size_label(self, base: Base) -> str:
        """The size, with the base's name where another base of its kind has the same size."""
        same = [b for b in self.bases_of(base.kind) if b.size_params == base.size_params]
        return base.size if len(same) == 1 else f"{base.size} {base.name}"

    def get(self, base: str, method: str, n: int, group: str) -> Stat | None:
        return self.stats.get((base, method, n, group))

    def mean(self, base: str, method: str, n: int, group: str) -> float | None:
        s = self.stats.get((base, method, n, group))
        return None if s is None else s.mean


def load_summary(run_dir: str | Path, n_boot: int = bootstrap.N_BOOT, boot_seed: int = bootstrap.BOOT_SEED
                 ) -> StudySummary:
    """The summary of a run directory (module docstring); n_boot 0 skips the bootstrap intervals."""
    run_dir = Path(run_dir)
    rows = read_ledger(run_dir)
    cells_path = run_dir / "cells.parquet"
    cells = pq.read_table(cells_path).to_pylist() if cells_path.exists() else []
    config = load_study_config(run_dir / "study.yaml") if (run_dir / "study.yaml").exists() else None
    cis = {}
    if n_boot and rows:
        reps = bootstrap.row_replicates(rows, run_dir, n_boot, boot_seed)
        cis = {key: bootstrap.interval(reps, w) for key, w in summary_weights(rows).items()}
    return build_summary(rows, cells, config, cis, name=run_dir.name, n_boot=n_boot if rows else 0)


def build_summary(rows: list[dict], cells: list[dict], config=None, cis: dict | None = None, name: str = "study",
                  n_boot: int = 0) -> StudySummary:
    """The summary from ledger rows, cells.parquet rows (may be empty), an optional StudyConfig and bootstrap
    intervals keyed like aggregate.summarize (SUMMARY_FIELDS)."""
    cis = cis or {}
    bases: dict[str, Base] = {}
    if config is not None:
        for b in config.bases:
            bases[b.name] = Base(b.name, b.kind, b.size, size_value(b.size))
    for r in [*cells, *rows]:
        bases.setdefault(r["base"], Base(r["base"], r["kind"], r["size"], size_value(r["size"])))
    ordered_bases = sorted(bases.values(), key=lambda b: (b.size_params, b.name))

    methods = [m.label for m in config.methods] if config is not None else []
    for r in [*cells, *rows]:
        if r["method"] != MULTITASK_LABEL and r["method"] not in methods:
            methods.append(r["method"])

    # planned seeds per (base, method, N): cells.parquet, or the ledger where there is none
    planned: dict[tuple[str, str, int], set[int]] = {}
    for r in cells or rows:
        planned.setdefault((r["base"], r["method"], r["n_experts"]), set()).add(r["seed"])
    multitask_bases = set(config.multitask) if config is not None else set()
    multitask_bases |= {r["base"] for r in rows if r["method"] == MULTITASK_LABEL}
    for (base, method, n), seeds in list(planned.items()):
        if method != MULTITASK_LABEL and base in multitask_bases:
            # the multitask baseline is scored per (base, N, seed) like a method, whether or not cells.parquet lists it
            planned.setdefault((base, MULTITASK_LABEL, n), set()).update(seeds)

    present = {r["group"] for r in rows}
    if config is not None:
        groups = ["held_in"] + (["held_out"] if config.held_out else [])
    else:
        groups = [g for g in GROUPS if g in present or not rows]
    groups += sorted(present - set(groups))  # tasks of a group of their own (a task YAML's "custom"): a table too

    done = {}
    for s in summarize(rows):
        key = (s["base"], s["method"], s["n_experts"], s["group"])
        done[key] = s
        planned.setdefault(key[:3], set()).update(s["seeds"])
    stats = {}
    for (base, method, n), seeds in planned.items():
        for g in groups:
            s = done.get((base, method, n, g))
            if s is None:
                stats[(base, method, n, g)] = Stat(None, None, 0, len(seeds))
            else:
                ci = cis.get(tuple(s[f] for f in SUMMARY_FIELDS))
                stats[(base, method, n, g)] = Stat(s["mean"], s["std"], s["n_seeds"], len(seeds | set(s["seeds"])),
                                                   ci)
    status: dict[str, int] = {}
    for c in cells:
        status[c["status"]] = status.get(c["status"], 0) + 1
    failed = [(f"{c['base']}/{c['method']}/N={c['n_experts']}/seed={c['seed']}", c["error"] or "")
              for c in cells if c["status"] == "failed"]
    study_name = config.name if config is not None else (rows[0]["study"] if rows else name)
    return StudySummary(study_name, ordered_bases, methods, sorted({k[2] for k in stats}), groups, stats, status,
                        failed, len(rows), n_boot)
