"""The report's 95% intervals: a paired bootstrap over evaluation examples. numpy, vectorized.

A replicate draws each task's examples with replacement, recomputes every ledger row's normalized score as the mean
of the merged model's per-example metric over the drawn ids / the mean of its reference's over the same ids, and
aggregates the rows with the point estimate's own weights (mergescale.eval.aggregate.summary_weights). One draw per
task (and set of example ids) serves every model scored on it: the merged models of every cell and seed and their
references, so differences between cells see the same evaluation set. A task's draws depend only on (seed, task,
its example ids): an interval does not move when other cells finish.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mergescale.eval.tasks import metric_column
from mergescale.study.ledger import StudyError

N_BOOT = 1000
BOOT_SEED = 0
LEVEL = 0.95


def resample_counts(n: int, n_boot: int, key: str) -> np.ndarray:
    """(n_boot, n) float64: how often each of n examples is drawn in each replicate (n draws with replacement),
    from a generator seeded by sha256(key)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (idx + (np.arange(n_boot) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def read_examples(path: Path, column: str) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(example ids, metric values, digest of the ids) of one per-example Parquet file, sorted by id; a StudyError
    names the file and what is wrong (missing, no such column, repeated ids, non-finite values)."""
    if not path.is_file():
        raise StudyError(f"{path}: per-example results missing (the ledger points to it)")
    f = pq.ParquetFile(path)  # a tenth of pq.read_table's cost per small file
    names = f.schema_arrow.names
    if column not in names or "example_id" not in names:
        raise StudyError(f"{path}: needs columns example_id and {column!r}; it has {', '.join(names)}")
    t = f.read(columns=["example_id", column], use_threads=False)
    ids = t.column("example_id").to_numpy(zero_copy_only=False).astype(str)
    values = t.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    if len(ids) == 0:
        raise StudyError(f"{path}: no examples")
    if (ids[1:] < ids[:-1]).any():
        order = np.argsort(ids, kind="stable")
        ids, values = ids[order], values[order]
    if (ids[1:] == ids[:-1]).any():
        raise StudyError(f"{path}: example_id {ids[1:][ids[1:] == ids[:-1]][0]!r} appears more than once")
    if not np.isfinite(values).all():
        raise StudyError(f"{path}: column {column!r} holds a value that is not a finite number "
                         f"(example {ids[~np.isfinite(values)][0]!r})")
    return ids, values, hashlib.sha256("\0".join(ids.tolist()).encode()).digest()


def row_replicates(rows: list[dict], run_dir: str | Path, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """(len(rows), n_boot): each ledger row's normalized score in each bootstrap replicate (module docstring).
    A replicate whose reference mean is 0 gives +inf (the ratio has no bound there). Every row's files are checked
    first: merged and reference scored on the same example ids, and their means equal the ledger's score and
    reference_score (so the replicates resample the numbers the point estimate used)."""
    run_dir = Path(run_dir)
    for i, r in enumerate(rows):
        for what in ("examples_path", "reference_examples_path"):
            if not r[what]:
                raise StudyError(f"ledger row {i} ({r['cell_key']}, task {r['task']!r}): no {what}")
    wanted = sorted({(r[p], metric_column(r["metric"])) for r in rows
                     for p in ("examples_path", "reference_examples_path")})
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # Parquet reads release the GIL
        files = dict(zip(wanted, pool.map(lambda k: read_examples(run_dir / k[0], k[1]), wanted)))

    groups: dict[tuple[str, bytes], list[int]] = {}  # (task, digest of its example ids) -> row indices
    for i, r in enumerate(rows):
        col = metric_column(r["metric"])
        ids, merged, digest = files[(r["examples_path"], col)]
        ref_ids, ref, ref_digest = files[(r["reference_examples_path"], col)]
        if digest != ref_digest:
            raise StudyError(f"task {r['task']!r}: {r['examples_path']} and its reference "
                             f"{r['reference_examples_path']} hold different example ids ({len(ids)} vs "
                             f"{len(ref_ids)}); a paired bootstrap needs the same examples")
        for values, score, name, rel in ((merged, r["score"], "score", r["examples_path"]),
                                         (ref, r["reference_score"], "reference_score", r["reference_examples_path"])):
            if not math.isclose(float(values.mean()), score, rel_tol=1e-9, abs_tol=1e-12):
                raise StudyError(f"ledger row {i} (task {r['task']!r}): {name} {score} is not the mean of {col!r} in "
                                 f"{rel} ({values.mean()}): the ledger and its per-example results disagree")
        groups.setdefault((r["task"], digest), []).append(i)

    out = np.empty((len(rows), n_boot))
    for (task, digest), idx in groups.items():
        col = metric_column(rows[idx[0]]["metric"])
        keys = sorted({(rows[i][p], col) for i in idx for p in ("examples_path", "reference_examples_path")})
        pos = {k: j for j, k in enumerate(keys)}
        values = np.stack([files[k][1] for k in keys])  # (models, n)
        n = values.shape[1]
        counts = resample_counts(n, n_boot, f"{seed}:{task}:{digest.hex()}")
        means = values @ counts.T / n  # (models, n_boot)
        num = means[[pos[(rows[i]["examples_path"], col)] for i in idx]]
        den = means[[pos[(rows[i]["reference_examples_path"], col)] for i in idx]]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[idx] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.inf)
    return out


def interval(replicates: np.ndarray, weights: dict[int, float], level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of the weighted aggregate of rows over the replicates (percentile method,
    no interpolation, so an infinite replicate never turns into NaN)."""
    idx = np.fromiter(weights.keys(), dtype=np.int64, count=len(weights))
    w = np.fromiter(weights.values(), dtype=np.float64, count=len(weights))
    est = w @ replicates[idx]
    tail = round((1 - level) / 2, 12)  # 0.025, not 0.025000000000000022: that would move the lower end one rank
    lo, hi = np.quantile(est, [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)
