"""A synthetic study run directory whose aggregates are numbers you choose: ledger.parquet, cells.parquet and the
per-example Parquet files, laid out as `mergescale study run` lays them out (mergescale.study.ledger), with no model.
The report's tests, its speed benchmark and the README's figure are made from these.

`value(cell, group)` gives a cell's target mean normalized score for held-in or held-out (None: the cell is not done
yet). Each category's datasets are spread around it symmetrically, so the category means and the cell's aggregate
equal it. With `discrete=False` every task is scored by a continuous metric (rouge_l) and the aggregates equal the
targets to rounding; with `discrete=True` tasks keep their registry metric and accuracy is a fraction of 0/1
examples, so the aggregates are near the targets, as real ones would be.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mergescale.eval.tasks import RANK_METRICS, metric_column
from mergescale.study.config import MULTITASK_LABEL, size_value
from mergescale.study.grid import Cell, categories_for
from mergescale.study.ledger import RunDir, ledger_rows, write_ledger


@dataclass(frozen=True)
class SynthTask:
    name: str
    category: str
    group: str  # held_in | held_out
    metric: str = "accuracy"


def registry_tasks() -> list[SynthTask]:
    """The paper's held-in and held-out tasks from the task registry."""
    from mergescale.eval.tasks import all_tasks

    return [SynthTask(t.name, t.category, t.group, t.metric) for t in all_tasks() if t.group in ("held_in", "held_out")]


# The paper's Tables 1-4 (average normalized performance; columns 1B, 8B, 24B, 64B x N = 2, 4, 6, 8).
PAPER_TABLES = {
    ("instruction_tuned", "held_in"): """
Average         0.85 0.78 0.81 0.83 0.90 0.82 0.82 0.85 0.94 0.84 0.80 0.77 0.97 0.91 0.89 0.93
Task Arithmetic 0.91 0.82 0.84 0.86 0.95 0.86 0.85 0.88 0.96 0.90 0.91 0.92 1.00 0.91 0.90 0.93
Dare-TIES       0.90 0.81 0.83 0.86 0.93 0.86 0.84 0.88 0.94 0.89 0.87 0.88 0.97 0.91 0.89 0.93
TIES            0.89 0.81 0.82 0.85 0.93 0.86 0.84 0.88 0.95 0.88 0.86 0.86 0.97 0.90 0.89 0.93
Multitask       0.97 0.96 0.96 0.96 0.96 0.96 0.97 0.96 0.99 0.97 0.98 0.98 0.99 0.98 0.98 0.99""",
    ("instruction_tuned", "held_out"): """
Average         0.99 1.00 1.04 1.05 1.03 1.02 1.03 1.02 1.05 1.10 1.11 1.16 1.00 1.03 1.06 1.09
Task Arithmetic 1.03 1.03 1.04 1.05 1.06 1.05 1.05 1.03 1.05 1.10 1.13 1.18 1.00 1.03 1.06 1.09
Dare-TIES       1.02 1.03 1.04 1.05 1.05 1.04 1.04 1.03 1.05 1.10 1.12 1.17 1.00 1.03 1.06 1.09
TIES            1.02 1.03 1.04 1.05 1.06 1.05 1.06 1.04 1.04 1.09 1.11 1.16 1.00 1.03 1.06 1.10
Multitask       1.11 1.11 1.11 1.11 1.12 1.12 1.12 1.12 1.18 1.18 1.18 1.18 1.05 1.05 1.05 1.05""",
    ("pretrained", "held_in"): """
Average         0.63 0.44 0.36 0.26 0.66 0.53 0.50 0.32 0.70 0.48 0.51 0.27 0.80 0.74 0.69 0.67
Task Arithmetic 0.66 0.52 0.44 0.39 0.68 0.54 0.54 0.42 0.72 0.56 0.60 0.46 0.80 0.74 0.69 0.67
Dare-TIES       0.65 0.51 0.42 0.37 0.66 0.51 0.51 0.32 0.67 0.44 0.51 0.27 0.80 0.74 0.69 0.67
TIES            0.66 0.50 0.41 0.33 0.67 0.52 0.48 0.29 0.68 0.49 0.52 0.27 0.80 0.71 0.65 0.56
Multitask       0.88 0.88 0.88 0.87 1.06 1.04 1.04 1.06 1.25 1.15 1.11 1.20 0.97 0.96 0.96 0.96""",
    ("pretrained", "held_out"): """
Average         0.98 1.00 1.02 1.04 1.01 0.97 1.02 0.98 0.95 0.85 0.93 0.83 1.28 1.24 1.29 1.25
Task Arithmetic 1.01 1.03 1.05 1.07 1.06 1.03 1.04 1.00 1.05 1.03 1.10 1.08 1.29 1.28 1.36 1.35
Dare-TIES       0.99 1.01 1.04 1.05 1.02 1.00 1.05 1.01 0.97 0.89 0.99 0.90 1.28 1.24 1.28 1.24
TIES            1.05 1.06 1.03 1.04 1.07 1.04 1.02 0.99 1.01 0.93 0.98 0.90 1.31 1.22 1.24 1.15
Multitask       1.10 1.10 1.10 1.10 1.62 1.62 1.62 1.62 1.51 1.51 1.51 1.51 1.73 1.73 1.73 1.72""",
}
PAPER_SIZES = ["1B", "8B", "24B", "64B"]
PAPER_NS = [2, 4, 6, 8]
PAPER_METHODS = ["Average", "Task Arithmetic", "Dare-TIES", "TIES"]
PAPER_BASES = [(f"{'it' if kind == 'instruction_tuned' else 'pt'}-{size.lower()}", kind, size)
               for kind in ("pretrained", "instruction_tuned") for size in PAPER_SIZES]


def paper_table(kind: str, group: str) -> dict[tuple[str, str, int], float]:
    """{(method label, size, N): the paper's number} of one of its Tables 1-4."""
    out = {}
    for line in PAPER_TABLES[(kind, group)].strip().splitlines():
        words = line.split()
        label = " ".join(words[:-16])
        for i, v in enumerate(words[-16:]):
            out[(label, PAPER_SIZES[i // 4], PAPER_NS[i % 4])] = float(v)
    return out


def paper_value(seed_step: float = 0.01, seeds: tuple[int, ...] = (0, 1, 2)) -> Callable[[Cell, str], float]:
    """value() for write_synthetic_run: each cell's seeds spread by seed_step around the paper's number, so the
    mean over `seeds` is that number."""
    tables = {key: paper_table(*key) for key in PAPER_TABLES}
    mid = sum(seeds) / len(seeds)

    def value(cell: Cell, group: str) -> float:
        return tables[(cell.kind, group)][(cell.method, cell.size, cell.n_experts)] + seed_step * (cell.seed - mid)

    return value


def _unit(*parts) -> float:
    """A number in [0, 1) fixed by its arguments."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") / 2**64


def write_synthetic_run(run_dir: str | Path, value: Callable[[Cell, str], float | None], *,
                        bases: list[tuple[str, str, str]], methods: list[str], num_experts: list[int],
                        seeds: list[int], tasks: list[SynthTask] | None = None, multitask: bool = True,
                        multitask_in_cells: bool = True, n_examples: int = 40, discrete: bool = False,
                        spread: float = 0.02, failed: Callable[[Cell], str | None] | None = None,
                        study: str = "synthetic") -> list[dict]:
    """Write the run directory (module docstring) and return its ledger rows. bases: (name, kind, size);
    failed(cell) -> an error message marks a pending cell failed."""
    run = RunDir(run_dir)
    tasks = tasks if tasks is not None else registry_tasks()
    if not discrete:
        tasks = [SynthTask(t.name, t.category, t.group, "rouge_l") for t in tasks]
    held_in = sorted({t.category for t in tasks if t.group == "held_in"})
    ids = [f"ex{i:05d}" for i in range(n_examples)]
    rng = np.random.default_rng(0)

    def write_examples(model: str, task: SynthTask, score: float) -> tuple[str, float]:
        """One model's per-example values on a task with mean `score` (0/1 for accuracies); (path, actual mean)."""
        if task.metric in RANK_METRICS:
            k = int(round(min(max(score, 0.0), 1.0) * n_examples))
            values = np.zeros(n_examples)
            values[rng.permutation(n_examples)[:k]] = 1.0
        else:
            z = rng.uniform(-1, 1, n_examples)
            values = score + 0.5 * score * (z - z.mean())
        rel = f"evals/{model}/examples/{task.name}.parquet"
        (run.root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"example_id": ids, metric_column(task.metric): values}), run.root / rel)
        return rel, float(values.mean())

    def score_row(model: str, key: str, task: SynthTask, score: float) -> dict:
        rel, actual = write_examples(model, task, score)
        return {"model": model, "task": task.name, "category": task.category, "group": task.group,
                "metric": task.metric, "score": actual, "n_examples": n_examples, "model_fingerprint": model,
                "examples_path": rel, "merge_s": 0.0, "eval_s": 0.0, "key": key}

    reference: dict[tuple[str, str], dict[str, dict]] = {}
    for name, _, _ in bases:
        for t in tasks:
            model = f"expert:{t.category}" if t.group == "held_in" else "base"
            score = 0.3 + 0.2 * _unit(name, model, t.name)
            reference.setdefault((name, model), {})[t.name] = score_row(f"ref-{name}-{model.replace(':', '-')}",
                                                                          f"ref-{name}", t, score)

    grid: list[Cell] = []
    for name, kind, size in sorted(bases, key=lambda b: (size_value(b[2]), b[0])):
        for n in num_experts:
            for seed in seeds:
                cats = categories_for(seed, n, held_in)
                labels = [(m, m.lower().replace(" ", "_")) for m in methods]
                labels += [(MULTITASK_LABEL, "multitask")] if multitask else []
                grid += [Cell(name, kind, size, m, mn, n, seed, cats) for m, mn in labels]

    results, cell_rows, keyed = {}, [], []
    for cell in grid:
        key = hashlib.sha256(cell.name.encode()).hexdigest()[:16]
        targets = {g: value(cell, g) for g in ("held_in", "held_out")}
        done = targets["held_in"] is not None
        if done:
            rows = []
            for t in tasks:
                if t.group == "held_in" and t.category not in cell.categories:
                    continue
                same = [x.name for x in tasks if x.group == t.group and x.category == t.category]
                offset = spread * (same.index(t.name) - (len(same) - 1) / 2)
                ref = reference[(cell.base, f"expert:{t.category}" if t.group == "held_in" else "base")][t.name]
                target = targets[t.group]
                if target is not None:
                    rows.append(score_row(key, key, t, (target + offset) * ref["score"]))
            results[key] = rows
            keyed.append((cell, key))
        error = None if done or failed is None else failed(cell)
        if cell.method != MULTITASK_LABEL or multitask_in_cells:
            cell_rows.append({"base": cell.base, "kind": cell.kind, "size": cell.size, "method": cell.method,
                              "method_name": cell.method_name, "n_experts": cell.n_experts, "seed": cell.seed,
                              "categories": list(cell.categories), "cell_key": key,
                              "status": "done" if done else ("failed" if error else "pending"), "error": error})
    rows = ledger_rows(study, "synthetic", keyed, results, reference)
    run.root.mkdir(parents=True, exist_ok=True)
    write_ledger(run, rows, cell_rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m mergescale.study.synthetic RUN_DIR`: a synthetic run directory of the paper's grid whose aggregates
    are its Tables 1-4 (0/1 accuracy on 200 examples per task, so near them), and its report."""
    import argparse

    from mergescale.study.report import write_report

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--examples", type=int, default=200)
    args = ap.parse_args(argv)
    if Path(args.run_dir).exists():
        raise SystemExit(f"{args.run_dir} exists; give a new directory")
    write_synthetic_run(args.run_dir, paper_value(), bases=PAPER_BASES, methods=PAPER_METHODS,
                        num_experts=PAPER_NS, seeds=[0, 1, 2], discrete=True, n_examples=args.examples)
    for name, paths in write_report(args.run_dir).items():
        for path in paths if isinstance(paths, list) else [paths]:
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
