"""The paper's normalized metric and its aggregation.

Held-in: a merged model's score on a dataset / the score of the expert of that dataset's category.
Held-out: merged score / the base model's score. Aggregation: mean over datasets within a category, then
over categories, then over seeds. Scores are plain {task name: score} dicts (e.g. from evaluate()["metrics"]);
`cell_scores` and `summarize` do the same over a study ledger's rows (mergescale.study.ledger).
"""

from __future__ import annotations

import math
from statistics import fmean, stdev

from mergescale.eval.tasks import get_task


def scores_from_metrics(metrics: list[dict]) -> dict[str, float]:
    """{task: primary score} from evaluate()["metrics"] or a metrics.parquet read as a list of dicts."""
    return {m["task"]: float(m["score"]) for m in metrics}


def normalize(scores: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """score / reference per task; every task needs a finite score and a positive finite reference (a NaN score,
    e.g. of a task that scored no rows, would make every average NaN)."""
    out = {}
    for task, s in scores.items():
        ref = reference.get(task)
        if ref is None:
            raise KeyError(f"no reference score for task {task!r}")
        if not math.isfinite(ref) or ref <= 0:
            raise ValueError(f"reference score for task {task!r} is {ref}; cannot normalize by it")
        if not math.isfinite(s):
            raise ValueError(f"score for task {task!r} is {s}; a normalized average needs finite scores")
        out[task] = s / ref
    return out


def held_in_reference(expert_scores: dict[str, dict[str, float]], tasks) -> dict[str, float]:
    """Reference for held-in tasks: the score of the expert trained on the task's category.
    expert_scores: {category: {task: score of that category's expert}}."""
    ref = {}
    for name in tasks:
        cat = get_task(name).category
        if cat not in expert_scores or name not in expert_scores[cat]:
            raise KeyError(f"no score of the {cat!r} expert on task {name!r}")
        ref[name] = expert_scores[cat][name]
    return ref


def category_means(normalized: dict[str, float], category_of=None) -> dict[str, float]:
    """Mean of the normalized scores of the datasets in each category."""
    category_of = category_of or (lambda t: get_task(t).category)
    by_cat: dict[str, list[float]] = {}
    for task, v in normalized.items():
        by_cat.setdefault(category_of(task), []).append(v)
    return {c: fmean(vs) for c, vs in sorted(by_cat.items())}


def aggregate(normalized: dict[str, float], category_of=None) -> float:
    """One seed: mean over categories of the per-category means (so each category weighs the same)."""
    return fmean(category_means(normalized, category_of).values())


def aggregate_seeds(per_seed: list[dict[str, float]], category_of=None) -> float:
    """Mean over seeds of the per-seed aggregate (each seed may merge a different set of categories)."""
    if not per_seed:
        raise ValueError("no seeds to aggregate")
    return fmean(aggregate(n, category_of) for n in per_seed)


def normalized_performance(merged: dict[str, float], reference: dict[str, float], category_of=None) -> dict:
    """Convenience: per-task ratios, per-category means and the overall average for one merged model."""
    norm = normalize(merged, reference)
    cats = category_means(norm, category_of)
    return {"tasks": norm, "categories": cats, "average": fmean(cats.values())}


# -- a study's ledger: one row per (cell, task), rows as dicts (mergescale.study.ledger) ----------------------------
CELL_FIELDS = ("base", "kind", "size", "method", "n_experts", "seed", "group")
SUMMARY_FIELDS = ("base", "kind", "size", "method", "n_experts", "group")


def cell_scores(rows: list[dict]) -> dict[tuple, float]:
    """One number per (base, kind, size, method, n_experts, seed, group): the mean over categories of the mean
    normalized score of each category's datasets (dataset -> category). Rows of one cell and group only."""
    by_cell: dict[tuple, dict[str, float]] = {}
    for r in rows:
        key = tuple(r[f] for f in CELL_FIELDS)
        tasks = by_cell.setdefault(key, {})
        if r["task"] in tasks:
            raise ValueError(f"ledger holds task {r['task']!r} twice for cell {dict(zip(CELL_FIELDS, key))}")
        if r["normalized"] is None or not math.isfinite(r["normalized"]):
            raise ValueError(f"ledger row {dict(zip(CELL_FIELDS, key))} task {r['task']!r}: normalized score "
                             f"{r['normalized']!r} is not a finite number")
        tasks[r["task"]] = r["normalized"]
    category = {r["task"]: r["category"] for r in rows}
    return {key: aggregate(tasks, category.__getitem__) for key, tasks in by_cell.items()}


def summarize(rows: list[dict]) -> list[dict]:
    """The paper's table cells: per (base, kind, size, method, n_experts, group) the mean over seeds of
    cell_scores (-> seed), the sample standard deviation over seeds (None with one seed) and the seeds present."""
    per: dict[tuple, dict[int, float]] = {}
    for key, score in cell_scores(rows).items():
        d = dict(zip(CELL_FIELDS, key))
        per.setdefault(tuple(d[f] for f in SUMMARY_FIELDS), {})[d["seed"]] = score
    out = []
    for key, by_seed in per.items():
        vals = [by_seed[s] for s in sorted(by_seed)]
        out.append({**dict(zip(SUMMARY_FIELDS, key)), "mean": fmean(vals),
                    "std": stdev(vals) if len(vals) > 1 else None, "n_seeds": len(vals), "seeds": sorted(by_seed)})
    return out


def summary_weights(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """summarize's means as weights on the rows: per SUMMARY_FIELDS key, {row index: w} with
    sum(w * rows[i]["normalized"]) equal to that key's mean, w = 1 / (seeds x the seed's categories x the category's
    datasets). A resample of the rows' normalized scores (the report's bootstrap) aggregated with these weights is
    aggregated exactly like the point estimate."""
    tree: dict[tuple, dict[int, dict[str, list[int]]]] = {}  # key -> seed -> category -> row indices
    for i, r in enumerate(rows):
        key = tuple(r[f] for f in SUMMARY_FIELDS)
        tree.setdefault(key, {}).setdefault(r["seed"], {}).setdefault(r["category"], []).append(i)
    out = {}
    for key, seeds in tree.items():
        out[key] = {i: 1.0 / (len(seeds) * len(cats) * len(idx))
                    for cats in seeds.values() for idx in cats.values() for i in idx}
    return out
