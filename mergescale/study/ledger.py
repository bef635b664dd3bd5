"""A study's run directory and its results ledger (Parquet).

    RUN_DIR/
      study.yaml               the study config as resolved (absolute paths), rewritten by every `study run`
      run.json                 mergescale version, start time, the driver's host and pid
      plan.json                every cell with its key (written once the keys are known)
      digests.json             content digests of input models (cached by path, size and mtime)
      models/<base>/...        experts and multitask models the study trained
      references/<key>.parquet the per-task scores of a reference model (base, an expert, multitask)
      results/<key>.parquet    the per-task scores of a merged model: the durable record that a cell is done
      failed/<key>.json        the error of a failed cell (removed when it succeeds on a rerun)
      running/<key>.json       a cell in flight (its merge or evaluation started, not finished)
      manifests/<key>.json     each merge's manifest (inputs, parameters, shard sha256s: provenance)
      merged/<key>/            merged checkpoints, deleted once scored unless keep_merged selects them
      evals/<key>/             evaluate() output of each model: score cache, per-example rows, metrics
      timings.jsonl            one line per training, evaluation and merge (start, end): the benchmark's split
      ledger.parquet           derived: one row per (cell, task), LEDGER_SCHEMA
      cells.parquet            derived: one row per planned cell with its status and error

Every file is written to a temporary name and renamed, so a crash never leaves a half-written result that looks
finished; the ledger is derived from results/ and references/ and rewritten as cells finish (and at every start).
A cell's key is a hash of its merge config (input models by content digest) and evaluation settings, so cells
that merge the same models the same way share one result, and a grown grid reruns only cells with new keys.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mergescale.eval.results import write_json_atomic, write_parquet_atomic

LEDGER_SCHEMA = pa.schema([
    ("study", pa.string()),
    ("base", pa.string()), ("kind", pa.string()), ("size", pa.string()), ("size_params", pa.float64()),
    ("method", pa.string()), ("method_name", pa.string()),
    ("n_experts", pa.int32()), ("seed", pa.int32()), ("categories", pa.list_(pa.string())),
    ("task", pa.string()), ("category", pa.string()), ("group", pa.string()), ("metric", pa.string()),
    ("score", pa.float64()), ("n_examples", pa.int32()),
    ("reference", pa.string()), ("reference_score", pa.float64()), ("normalized", pa.float64()),
    ("model_fingerprint", pa.string()), ("cell_key", pa.string()),
    ("examples_path", pa.string()), ("reference_examples_path", pa.string()),
    ("merge_s", pa.float64()), ("eval_s", pa.float64()),
    ("mergescale_version", pa.string()),
])
# The per-task rows of a model's scores (results/ and references/).
SCORE_SCHEMA = pa.schema([
    ("model", pa.string()), ("task", pa.string()), ("category", pa.string()), ("group", pa.string()),
    ("metric", pa.string()), ("score", pa.float64()), ("n_examples", pa.int32()),
    ("model_fingerprint", pa.string()), ("examples_path", pa.string()),
    ("merge_s", pa.float64()), ("eval_s", pa.float64()), ("key", pa.string()),
])
CELL_SCHEMA = pa.schema([
    ("base", pa.string()), ("kind", pa.string()), ("size", pa.string()), ("method", pa.string()),
    ("method_name", pa.string()), ("n_experts", pa.int32()), ("seed", pa.int32()),
    ("categories", pa.list_(pa.string())), ("cell_key", pa.string()), ("status", pa.string()), ("error", pa.string()),
])


class StudyError(RuntimeError):
    """A study cannot go on (a reference score of 0, a run directory of another study): the message says why."""


class RunDir:
    """Paths and atomic reads/writes of one study's run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def rel(self, p: str | Path) -> str:
        return os.path.relpath(Path(p).absolute(), self.root)

    # -- scores ---------------------------------------------------------------------------------------------
    def write_scores(self, kind: str, key: str, rows: list[dict]) -> None:
        """kind: "results" (a merged model) or "references"; the file's existence marks the work done."""
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), self.path(kind, f"{key}.parquet"))

    def read_scores(self, kind: str, key: str) -> list[dict] | None:
        p = self.path(kind, f"{key}.parquet")
        return pq.read_table(p).to_pylist() if p.exists() else None

    def done_keys(self, kind: str) -> set[str]:
        d = self.path(kind)
        return {p.stem for p in d.glob("*.parquet")} if d.exists() else set()

    # -- cell state -----------------------------------------------------------------------------------------
    def mark_failed(self, key: str, cell_names: list[str], stage: str, error: str) -> None:
        write_json_atomic({"key": key, "cells": cell_names, "stage": stage, "error": error, "time": time.time()},
                          self.path("failed", f"{key}.json"))

    def failures(self) -> dict[str, dict]:
        d = self.path("failed")
        return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} if d.exists() else {}

    def clear_failed(self, key: str) -> None:
        self.path("failed", f"{key}.json").unlink(missing_ok=True)

    def mark_running(self, key: str, stage: str) -> None:
        write_json_atomic({"stage": stage, "since": time.time(), "pid": os.getpid(), "host": socket.gethostname()},
                          self.path("running", f"{key}.json"))

    def clear_running(self, key: str) -> None:
        self.path("running", f"{key}.json").unlink(missing_ok=True)

    def running(self) -> dict[str, dict]:
        d = self.path("running")
        return {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")} if d.exists() else {}

    def log_timing(self, kind: str, key: str, start: float, end: float, **extra) -> None:
        line = json.dumps({"kind": kind, "key": key, "start": start, "end": end, **extra})
        with open(self.path("timings.jsonl"), "a") as f:  # one short line per write: appends stay whole
            f.write(line + "\n")

    def timings(self) -> list[dict]:
        p = self.path("timings.jsonl")
        if not p.exists():
            return []
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip().endswith("}")]


def ledger_rows(study: str, version: str, cells: list[tuple], results: dict[str, list[dict]],
                reference: dict[tuple[str, str], dict[str, dict]]) -> list[dict]:
    """The ledger: one row per (cell, task) of every finished cell.

    cells: (Cell, key) pairs (multitask pseudo-cells have key None: their scores are the multitask reference's on
    the cell's tasks). results: key -> per-task score rows. reference: (base, model) -> {task: score row}, model
    "base", "expert:<category>" or "multitask". Held-in tasks are normalized by the category expert's score,
    held-out tasks by the base's; a reference that is missing, zero or not finite is a StudyError (a ratio to it
    would be a wrong number)."""
    from mergescale.study.config import size_value

    out = []
    for cell, key in cells:
        if key is None:
            scores = reference.get((cell.base, "multitask"))
            rows = [r for r in (scores or {}).values() if r["group"] == "held_out" or r["category"] in cell.categories]
        else:
            rows = results.get(key)
        if not rows:
            continue
        for r in rows:
            ref_model = f"expert:{r['category']}" if r["group"] == "held_in" else "base"
            ref = reference.get((cell.base, ref_model), {}).get(r["task"])
            if ref is None:
                raise StudyError(f"{cell.name}: no score of the {ref_model} model of base {cell.base!r} on task "
                                 f"{r['task']!r} to normalize by")
            if not (math.isfinite(ref["score"]) and ref["score"] > 0):
                raise StudyError(f"task {r['task']!r}: the {ref_model} model of base {cell.base!r} scores "
                                 f"{ref['score']}; a score cannot be normalized by it (check the task's data and the "
                                 f"reference model: {ref['examples_path']})")
            out.append({
                "study": study, "base": cell.base, "kind": cell.kind, "size": cell.size,
                "size_params": size_value(cell.size), "method": cell.method, "method_name": cell.method_name,
                "n_experts": cell.n_experts, "seed": cell.seed, "categories": list(cell.categories),
                "task": r["task"], "category": r["category"], "group": r["group"], "metric": r["metric"],
                "score": r["score"], "n_examples": r["n_examples"], "reference": ref_model,
                "reference_score": ref["score"], "normalized": r["score"] / ref["score"],
                "model_fingerprint": r["model_fingerprint"], "cell_key": key or r["key"],
                "examples_path": r["examples_path"], "reference_examples_path": ref["examples_path"],
                "merge_s": r["merge_s"], "eval_s": r["eval_s"], "mergescale_version": version,
            })
    return out


def write_ledger(run: RunDir, rows: list[dict], cell_rows: list[dict]) -> None:
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA), run.path("ledger.parquet"))
    write_parquet_atomic(pa.Table.from_pylist(cell_rows, schema=CELL_SCHEMA), run.path("cells.parquet"))


def read_ledger(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "ledger.parquet"
    if not p.exists():
        raise StudyError(f"{run_dir}: no ledger.parquet (is this a study run directory? `mergescale study run` "
                         "writes it as cells finish)")
    return pq.read_table(p).to_pylist()


def status(run_dir: str | Path) -> dict:
    """Where a study stands: its planned cells (plan.json of the last `study run`) split into done, failed (with
    their errors), running (in flight, or interrupted when the driver that ran them is gone) and pending."""
    run = RunDir(run_dir)
    plan_file = run.path("plan.json")
    if not plan_file.exists():
        raise StudyError(f"{run.root}: no plan.json; `mergescale study run CONFIG` writes it once the study's "
                         "trainings and reference evaluations are done")
    planned = json.loads(plan_file.read_text())["cells"]
    done, failures, running = run.done_keys("results"), run.failures(), run.running()
    driver = json.loads(run.path("run.json").read_text()) if run.path("run.json").exists() else {}
    alive = driver.get("host") == socket.gethostname() and _pid_alive(driver.get("pid"))
    out = {"done": [], "failed": [], "running": [], "pending": [], "driver_alive": alive}
    for c in planned:
        k = c["key"]
        if k in done:
            out["done"].append(c)
        elif k in failures:
            out["failed"].append({**c, **{x: failures[k][x] for x in ("stage", "error")}})
        elif k in running:
            out["running"].append({**c, "stage": running[k]["stage"], "since": running[k]["since"],
                                   "interrupted": not alive})
        else:
            out["pending"].append(c)
    return out


def _pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True
