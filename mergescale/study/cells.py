"""What one study cell is: its merge config, its key, and the two functions that do its work (merge, evaluate).

`merge_model` and `evaluate_model` are plain functions of plain arguments: the study's Ray runner runs them as
tasks (mergescale.cluster.study), and a test can call them directly. A cell's key hashes what its result depends
on: the merge (method, parameters, DARE seed, output dtype, and the base's and experts' *content* digests) and the
evaluation (backend, settings, and each task's definition and data digest). Equal keys share one result.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from mergescale.study.grid import Cell
from mergescale.study.plan import ModelRef, StudyPlan, file_sha256

# Files of a model directory that are mergescale's bookkeeping, not the model.
_NOT_MODEL = ("mergescale_manifest.json", "metrics.jsonl")
MANIFEST = "mergescale_manifest.json"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Digests:
    """Content digests of model directories (sha256 of every file), cached in RUN_DIR/digests.json by each file's
    path, size, mtime and inode: a model replaced in place gets a new digest, so no stale result is reused."""

    def __init__(self, path: Path):
        self.path = path
        self.cache: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def model(self, model_dir: str | Path) -> str:
        d = Path(model_dir).resolve()
        files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name not in _NOT_MODEL)
        if not files:
            raise FileNotFoundError(f"{d}: no model files")
        keys = {p: self._key(p) for p in files}
        todo = [p for p in files if keys[p] not in self.cache]
        if todo:  # shards hash in parallel (hashlib releases the GIL): a 64B model's 128 GB is read once, cached after
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
                for p, digest in zip(todo, pool.map(file_sha256, todo)):
                    self.cache[keys[p]] = digest
            self.save()
        return _sha([(p.name, self.cache[keys[p]]) for p in files])

    @staticmethod
    def _key(p: Path) -> str:
        st = p.stat()
        return f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"

    def save(self) -> None:
        from mergescale.eval.results import write_json_atomic

        write_json_atomic(self.cache, self.path)


def eval_identity(plan: StudyPlan, tasks: list[str]) -> dict:
    ev = plan.config.eval
    return {"settings": ev.model_dump(mode="json", exclude={"replicas", "num_cpus", "num_gpus", "data_dir",
                                                             "tasks_yaml"}),
            "tasks": {t: plan.task_fingerprints[t] for t in tasks}}


def merge_config(plan: StudyPlan, cell: Cell) -> dict:
    """The merge config of a cell (a MergeConfig dict): the base and the experts of its categories, sorted (DARE
    masks depend on each expert's position)."""
    m = plan.config.methods[[x.label for x in plan.config.methods].index(cell.method)]
    ms = plan.config.merge
    return {
        "base": str(plan.models[(cell.base, "base")].path),
        "experts": [str(plan.models[(cell.base, f"expert:{c}")].path) for c in cell.categories],
        "method": m.method, "parameters": m.parameters, "seed": plan.dare_seed(cell) or 0,
        "out_dtype": ms.out_dtype, "tile_mb": ms.tile_mb,
        # in a study, a merge waiting for its actors' resources waits for other cells to finish: not an error
        "cluster": {"workers": ms.workers or 1, "num_cpus": ms.num_cpus, "num_gpus": ms.num_gpus,
                    "placement_timeout_s": 7 * 24 * 3600.0},
    }


def cell_key(plan: StudyPlan, cell: Cell, digests: Digests) -> str:
    cfg = merge_config(plan, cell)
    ident = {k: v for k, v in cfg.items() if k not in ("base", "experts", "tile_mb", "cluster")}
    ident["base"] = digests.model(cfg["base"])
    ident["experts"] = [digests.model(e) for e in cfg["experts"]]
    return _sha(["cell", ident, eval_identity(plan, plan.cell_tasks(cell))])[:32]


def reference_key(plan: StudyPlan, model: ModelRef, digests: Digests) -> str:
    return _sha(["reference", digests.model(model.path), eval_identity(plan, plan.tasks_of_model(model.role))])[:32]


def eval_settings(plan: StudyPlan) -> dict:
    """What evaluate_model needs besides the model and tasks (plain JSON, sent to a Ray task)."""
    return plan.config.eval.model_dump(mode="json")


# -- the work (run as Ray tasks by the study's runner) ---------------------------------------------------------------
def merge_model(config: dict, out: str, workers: int | None) -> dict:
    """Merge one cell into `out` (resuming a partial merge there; reusing a complete one). Returns the manifest's
    summary: the model's content fingerprint (sha256 of its shards' sha256s), bytes read, seconds."""
    import mergescale

    t0 = time.time()
    manifest_path = Path(out) / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
    else:
        manifest = mergescale.merge(config, out, workers=workers, progress=False)
    shards = {name: s["sha256"] for name, s in sorted(manifest["outputs"].items())}
    return {"fingerprint": _sha(shards)[:32], "manifest": manifest, "start": t0, "end": time.time()}


def train_model(recipe: str, train_config: dict, overwrite: bool, progress: bool) -> dict:
    """Train one expert or multitask model (mergescale.training.train: Ray Train workers, resumable)."""
    from mergescale.training import train

    t0 = time.time()
    manifest = train(recipe, train_config, overwrite=overwrite, progress=progress)
    return {"steps": manifest.get("steps"), "start": t0, "end": time.time()}


def evaluate_model(model_dir: str, tasks: list[str], out: str, settings: dict) -> dict:
    """Evaluate one model on `tasks` (per-example rows and a score cache under `out`, so a rerun resumes).
    Returns evaluate()'s per-task metrics and timing."""
    from mergescale.eval import evaluate

    t0 = time.time()  # the evaluation's setup (a fresh worker's transformers import) is its time, as a replica's is
    worker_setup(settings)
    setup_s = time.time() - t0
    result = evaluate(model_dir, tasks=tasks, backend=settings["backend"], replicas=settings["replicas"], out=out,
                      num_cpus_per_replica=settings["num_cpus"], num_gpus_per_replica=settings["num_gpus"],
                      **_eval_kwargs(settings))
    return {"metrics": result["metrics"], "computed": result["computed"], "cached": result["cached"], "start": t0,
            "setup_s": setup_s, "end": time.time()}


def push_model(config: dict, tasks: list[str], out: str, settings: dict, resident=None, runner=None) -> dict:
    """Merge one cell into `resident` (its base's model kept loaded, eval.resident; None: loaded here) without
    writing it, and evaluate it there; `runner` merges it (None: this process; cluster.merge.RayPushRunner: the
    study's merge actors, which send the rows to this process). Returns the pushed model's fingerprint (a hash of
    the merge's per-tensor digests, checked against what the model holds before scoring), the manifest, the
    metrics and the times."""
    from mergescale.eval.merge_eval import evaluate_merge, load_resident, resident_source

    t0 = time.time()
    worker_setup(settings)
    if resident is None:
        resident = load_resident(resident_source(config), settings["backend"], dtype=settings["dtype"],
                                 max_length=settings["max_length"])
    result = evaluate_merge(config, resident, runner=runner, tasks=tasks, out=out, **_eval_kwargs(settings))
    manifest = result["manifest"]
    return {"fingerprint": manifest["pushed"]["fingerprint"], "manifest": manifest, "metrics": result["metrics"],
            "computed": result["computed"], "cached": result["cached"], "start": t0,
            "merge_end": t0 + manifest["timing"]["total_s"], "end": time.time(), "pushes": resident.pushes}


def worker_setup(settings: dict) -> None:
    from transformers.utils import logging as hf_logging

    from mergescale.eval.tasks import register_tasks

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per evaluation, from every worker, is noise
    for y in settings.get("tasks_yaml") or []:  # this process may be a fresh Ray worker: register custom tasks
        register_tasks(y, replace=True)


def _eval_kwargs(settings: dict) -> dict:
    return dict(data_dir=settings["data_dir"], template=settings["template"], limit=settings["limit"],
                sample_seed=settings["sample_seed"], max_length=settings["max_length"], dtype=settings["dtype"],
                max_unscorable=settings["max_unscorable"], chat_template=settings["chat_template"], progress=False)


def score_rows(run_root: Path, model: str, key: str, metrics: list[dict], groups: dict[str, str], fingerprint: str,
               eval_out: Path, merge_s: float | None, eval_s: float) -> list[dict]:
    """The SCORE_SCHEMA rows of one evaluated model (mergescale.study.ledger). groups: task -> held_in | held_out
    as the study uses it (a custom task selected by held_out is held-out here)."""
    import math
    import os

    rows = []
    for m in metrics:
        if m["score"] is None or not math.isfinite(m["score"]):
            raise ValueError(f"{model}: task {m['task']} scored {m['score']!r} (n={m['n']}): not a finite score")
        rows.append({"model": model, "task": m["task"], "category": m["category"], "group": groups[m["task"]],
                     "metric": m["metric"], "score": float(m["score"]), "n_examples": int(m["n"]),
                     "model_fingerprint": fingerprint,
                     "examples_path": os.path.relpath(eval_out / "examples" / f"{m['task']}.parquet", run_root),
                     "merge_s": merge_s, "eval_s": eval_s, "key": key})
    return rows
