"""`study.run(config)`: the paper's grid as one resumable run, top to bottom.

    plan (validate everything)  ->  train the experts and multitask models the config asks for, and evaluate each
        reference model once (base: every task; an expert: its category's tasks; multitask: all; a trained model
        right after its training, the others alongside the trainings)
    ->  every cell not done yet: merge -> evaluate (its N categories' held-in tasks + every held-out task)
        -> record its scores -> delete the merged checkpoint (unless keep_merged)
    ->  ledger (scores normalized as the paper does) -> summary -> report
    ->  merges that keep_merged selects but whose cells were scored without keeping them: merged again to disk

Merges and evaluations are Ray tasks (mergescale.cluster.study): different cells merge and evaluate side by side,
with at most `max_merged_alive` cells in flight. A cell's result is written only once it is complete
(results/<key>.parquet), so a killed study rerun with the same command redoes only unfinished cells; a failed
cell is recorded (failed/<key>.json, with its error) and the study goes on.

Over 400 lines on purpose: the whole flow reads here, top to bottom, with the work itself in study/cells.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

import mergescale
from mergescale.eval.aggregate import summarize
from mergescale.eval.results import write_json_atomic
from mergescale.study import cells as C
from mergescale.study.config import MULTITASK_LABEL
from mergescale.study.ledger import StudyError, ledger_rows, write_ledger
from mergescale.study.plan import ModelRef, StudyPlan, make_plan

log = logging.getLogger(__name__)


def run(config, *, address: str | None = None, progress: bool = True, report: bool = True) -> dict:
    """Run (or resume, or grow) a study; returns {"run_dir", "cells", "done", "failed", "ledger", "report"}."""
    t_start = time.time()
    plan = make_plan(config, address=address)
    t_plan = time.time()
    rd = plan.run
    _open_run_dir(plan)
    digests = C.Digests(rd.path("digests.json"))
    from mergescale.cluster.session import ensure_ray

    ensure_ray(plan.config.address)  # only once the plan holds: a bad config starts nothing
    rd.log_timing("plan", "study", t_start, t_plan)  # where a run's first seconds go (docs/BENCHMARKS.md)
    rd.log_timing("ray_ready", "study", t_start, time.time())

    # -- 1, 2. trainings and reference evaluations, each model once -------------------------------------------------
    refs = _references(plan, digests, progress)

    # -- 3. cells -----------------------------------------------------------------------------------------------------
    keys = {c: C.cell_key(plan, c, digests) for c in plan.cells}
    write_json_atomic({"cells": [{"cell": c.name, "key": k} for c, k in keys.items()]}, rd.path("plan.json"))
    results = {k: rd.read_scores("results", k) for k in set(keys.values()) if k in rd.done_keys("results")}
    _cleanup(plan, set(results) - {k for c, k in keys.items() if plan.keeps(c)})
    _run_cells(plan, keys, results, refs, progress)

    # -- 4. ledger, summary, report -------------------------------------------------------------------------------
    rows = _write_ledger(plan, keys, results, refs)
    failed = rd.failures()
    done = sum(k in results for k in keys.values())
    rd.log_timing("run", "study", t_start, time.time(), cells=len(keys), done=done)
    if progress:
        print_summary(rows, plan, done, failed)
    out = {"run_dir": str(rd.root), "cells": len(keys), "done": done, "failed": len(failed),
           "ledger": str(rd.path("ledger.parquet")), "report": None}
    if report:
        out["report"] = _report(rd.root, progress)
    errors = _keep_scored_merges(plan, keys, results, progress)
    if errors:
        raise StudyError("merges that keep_merged selects could not be kept (the cells' scores stand):\n  "
                         + "\n  ".join(errors))
    return out


# -- run directory ---------------------------------------------------------------------------------------------------
def _open_run_dir(plan: StudyPlan) -> None:
    rd = plan.run
    old = rd.path("study.yaml")
    if old.exists():
        name = (yaml.safe_load(old.read_text()) or {}).get("name")
        if name != plan.config.name:
            raise StudyError(f"work_dir {rd.root} holds study {name!r}, not {plan.config.name!r}; choose another "
                             "work_dir (or the same name to resume or grow that study)")
    rd.root.mkdir(parents=True, exist_ok=True)
    tmp = rd.path(".study.yaml.tmp")
    tmp.write_text(yaml.safe_dump(plan.config.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, old)
    write_json_atomic({"mergescale_version": mergescale.__version__, "started": time.time(),
                       "host": socket.gethostname(), "pid": os.getpid()}, rd.path("run.json"))


def _cleanup(plan: StudyPlan, unkept_done: set[str]) -> None:
    """Merged checkpoints of cells already scored and not kept (a crash between scoring and deleting), and stale
    markers."""
    rd = plan.run
    for key in rd.running():
        rd.clear_running(key)
    if rd.path("merged").exists():
        for d in rd.path("merged").iterdir():
            if d.name in unkept_done:
                shutil.rmtree(d, ignore_errors=True)


# -- trainings and reference evaluations ------------------------------------------------------------------------------
_NOT_COMPARED = ("cluster", "checkpoint_every", "keep_checkpoints", "checkpoint_dir", "out")
# Trainings queue for the cluster's resources behind each other and behind evaluations: Ray Train's default is to
# fail a worker group not started within 60 s (then retry, then give up), which a study's queue is not.
TRAIN_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(7 * 24 * 3600)}


def _training_needed(m: ModelRef) -> bool | None:
    """None: the model in m.path was trained with these settings already; else whether training must replace it."""
    from mergescale.training.config import load_train_config

    manifest = m.path / C.MANIFEST
    if not manifest.exists():
        return False
    had = json.loads(manifest.read_text()).get("config", {})
    want = load_train_config(m.train).model_dump(mode="json")
    diff = sorted(k for k in want if k not in _NOT_COMPARED and had.get(k) != want[k])
    if not diff:
        return None
    log.warning("%s was trained with other settings (%s); training it again", m.path, ", ".join(diff))
    return True


def _groups(plan: StudyPlan) -> dict[str, str]:
    g = {t: "held_in" for ts in plan.tasks_of.values() for t in ts}
    g.update({t: "held_out" for t in plan.held_out})
    return g


def _references(plan: StudyPlan, digests: C.Digests, progress: bool) -> dict[tuple[str, str], dict[str, dict]]:
    """Train what the study trains, and evaluate every reference model once: {(base, role): {task: score row}}.

    One job per reference model, all at once: a model the study trains is trained (a Ray task running Ray Train),
    then evaluated; the others are evaluated right away, side by side with the trainings."""
    from mergescale.cluster.study import Step, run_jobs

    rd, ev = plan.run, plan.config.eval
    overwrite = {m: _training_needed(m) for m in plan.trainings()}
    to_train = {m for m, o in overwrite.items() if o is not None}
    keys = {m: C.reference_key(plan, m, digests) for m in plan.references() if m not in to_train}
    settings, groups = C.eval_settings(plan), _groups(plan)
    done = rd.done_keys("references")
    jobs = [m for m in plan.references() if m in to_train or keys[m] not in done]
    bar = _bar(len(plan.references()) + len(to_train), "trainings and reference evaluations", "job", progress,
               initial=len(plan.references()) - len(jobs))
    errors = []

    def evaluation(m: ModelRef):
        k = keys[m]
        return Step(C.evaluate_model, (str(m.path), plan.tasks_of_model(m.role), str(rd.path("evals", k)), settings),
                    *_eval_resources(ev), name=f"eval {m.base} {m.role}")

    def first(m: ModelRef):
        if m in to_train:  # the Ray Train workers hold the training's resources, not this task
            return Step(C.train_model, (m.recipe, m.train, overwrite[m], progress), 0.0, 0.0,
                        name=f"train {m.base} {m.role}", env=TRAIN_ENV)
        return evaluation(m)

    def next_step(m: ModelRef, step, res):
        bar.update(1)
        if step.fn is C.train_model:
            tokens = _trained_tokens(m.path)
            rd.log_timing("train", f"{m.base}/{m.role}", res["start"], res["end"],
                          param_tokens=tokens * plan.model_params[m.base], steps=res["steps"])
            keys[m] = C.reference_key(plan, m, digests)
            return evaluation(m) if keys[m] not in done else None
        k = keys[m]
        fp = digests.model(m.path)[:32]
        rows = C.score_rows(rd.root, f"{m.base}/{m.role}", k, res["metrics"], groups, fp, rd.path("evals", k), None,
                            res["end"] - res["start"])
        rd.write_scores("references", k, rows)
        rd.log_timing("eval", k, res["start"], res["end"], model=f"{m.base}/{m.role}",
                      param_examples=res["computed"] * plan.model_params[m.base], setup_s=res["setup_s"])
        return None

    def failed(m: ModelRef, step, err):
        what = "training" if step.fn is C.train_model else "evaluation"
        errors.append(f"{what} of {m.base} {m.role} ({m.path}): {err}")
        bar.update(1 + (step.fn is C.train_model))

    run_jobs(jobs, first, next_step, failed, max_in_flight=max(1, len(jobs)), address=plan.config.address)
    bar.close()
    if errors:
        raise StudyError("the study cannot go on without its reference models (the cells are normalized by them):\n  "
                         + "\n  ".join(errors))
    out = {}
    for m, k in keys.items():
        out[(m.base, m.role)] = {r["task"]: r for r in rd.read_scores("references", k)}
    bad = [f"{b} {role}: task {t} scores {r['score']}" for (b, role), rs in out.items() for t, r in rs.items()
           if not r["score"] > 0]
    if bad:
        raise StudyError("reference scores of 0 cannot normalize anything (check these tasks' data and models):\n  "
                         + "\n  ".join(bad))
    return out


def _trained_tokens(model_dir: Path) -> int:
    p = model_dir / "metrics.jsonl"
    if not p.exists():
        return 0
    return sum(json.loads(x).get("tokens", 0) for x in p.read_text().splitlines() if x.strip())


def _eval_resources(ev) -> tuple[float, float]:
    """(num_cpus, num_gpus) of an evaluation task: its own backend in process, or with replicas only the driver."""
    return (ev.num_cpus, ev.num_gpus) if ev.replicas == 1 else (0.0, 0.0)


# -- cells -----------------------------------------------------------------------------------------------------------
def _run_cells(plan: StudyPlan, keys: dict, results: dict, refs: dict, progress: bool) -> None:
    from mergescale.cluster.study import Step, run_jobs

    rd, cfg = plan.run, plan.config
    cells_of: dict[str, list] = {}
    for c, k in keys.items():
        cells_of.setdefault(k, []).append(c)
    todo = [k for k in cells_of if k not in results]
    settings, groups = C.eval_settings(plan), _groups(plan)
    bar = _bar(len(keys), "study", "cell", progress, initial=sum(len(v) for k, v in cells_of.items() if k in results))
    state = {"merging": 0, "evaluating": 0, "failed": 0}
    merged: dict[str, dict] = {}
    # by push (plan.pushes): merged into a resident replica of the base and scored there; the others (merges kept
    # on disk, or every cell where the evaluation takes no push) written and read back
    pushed = [k for k in todo if plan.pushes(cells_of[k][0])]
    written = [k for k in todo if not plan.pushes(cells_of[k][0])]
    pool = None
    if pushed:
        from mergescale.cluster.resident import ResidentPool, ResidentRoomError
        from mergescale.cluster.session import ensure_ray

        ensure_ray(cfg.address)

        # max_merged_alive models alive at once here too (resident replicas; at least one per base), each with a
        # next cell queued so it never waits for the driver; the bases' cells interleaved so all of them start
        by_base: dict[str, list] = {}
        for k in pushed:
            by_base.setdefault(cells_of[k][0].base, []).append(k)
        per_base = max(1, cfg.max_merged_alive // len(by_base))
        pushed = [k for group in itertools.zip_longest(*by_base.values()) for k in group if k is not None]
        ms = cfg.merge
        merge_resources = (0.0, 0.0) if ms.workers is None else (ms.workers * ms.num_cpus, ms.workers * ms.num_gpus)
        pool = ResidentPool(settings, *_eval_resources(cfg.eval), per_base=per_base, merge_resources=merge_resources)
        try:
            pool.require_room(len(by_base))  # before any cell: replicas that never fit would wait forever
        except ResidentRoomError as e:
            raise StudyError(str(e)) from None

    def show():
        bar.set_postfix_str(f"merging {state['merging']}, evaluating {state['evaluating']}, failed {state['failed']}",
                            refresh=True)

    def started(key, step):
        stage = "eval" if step.fn is C.evaluate_model else "merge"
        state["merging" if stage == "merge" else "evaluating"] += 1
        rd.mark_running(key, stage)
        show()

    def first(key):
        cell = cells_of[key][0]
        ms = cfg.merge
        config = C.merge_config(plan, cell)
        if plan.pushes(cell):  # merge and evaluation in one call on the base's resident replica, retried on a fresh one
            call = pool.call(config["base"])
            return Step(C.push_model, (config, plan.cell_tasks(cell), str(rd.path("evals", key)), settings,
                                       ms.workers),
                        name=f"push {cell.name}", submit=call.submit, retry=call.retry, retries=2)
        return _merge_step(plan, cell, key)

    def next_step(key, step, res):
        cell = cells_of[key][0]
        if step.fn is C.merge_model:
            state["merging"] -= 1
            merged[key] = res
            write_json_atomic(res["manifest"], rd.path("manifests", f"{key}.json"))
            rd.log_timing("merge", key, res["start"], res["end"], bytes_read=plan.merge_read_bytes(cell))
            return Step(C.evaluate_model, (str(rd.path("merged", key)), plan.cell_tasks(cell),
                                           str(rd.path("evals", key)), settings), *_eval_resources(cfg.eval),
                        name=f"eval {cell.name}")
        if step.fn is C.push_model:
            state["merging"] -= 1
            _check_pushed(step.args[0], res["manifest"], cell.name)
            if "replica_load" in res:  # this cell's replica was started for it: its load of the base
                rd.log_timing("replica_load", cell.base, *res["replica_load"])
            write_json_atomic(res["manifest"], rd.path("manifests", f"{key}.json"))
            rd.log_timing("merge", key, res["start"], res["merge_end"], bytes_read=plan.merge_read_bytes(cell),
                          pushed=True)
            m = {"fingerprint": res["fingerprint"], "start": res["start"], "end": res["merge_end"]}
            eval_start = res["merge_end"]
        else:
            state["evaluating"] -= 1
            m = merged.pop(key)
            eval_start = res["start"]
        rd.log_timing("eval", key, eval_start, res["end"],
                      param_examples=res["computed"] * plan.model_params[cell.base], setup_s=res.get("setup_s", 0.0))
        rows = C.score_rows(rd.root, cell.name, key, res["metrics"], groups, m["fingerprint"], rd.path("evals", key),
                            m["end"] - m["start"], res["end"] - eval_start)
        rd.write_scores("results", key, rows)  # the cell is done from here on
        results[key] = rows
        rd.clear_running(key)
        rd.clear_failed(key)
        if not plan.keeps(cell):
            shutil.rmtree(rd.path("merged", key), ignore_errors=True)
        _write_ledger(plan, keys, results, refs)
        bar.update(len(cells_of[key]))
        show()
        return None

    def failed(key, step, err):
        stage = {C.merge_model: "merge", C.push_model: "merge and evaluation"}.get(step.fn, "evaluation")
        state["evaluating" if step.fn is C.evaluate_model else "merging"] -= 1
        state["failed"] += 1
        merged.pop(key, None)
        rd.mark_failed(key, [c.name for c in cells_of[key]], stage, err)
        rd.clear_running(key)
        bar.write(f"cell {cells_of[key][0].name} failed in its {stage}: {err.splitlines()[0][:300]}")
        bar.update(len(cells_of[key]))
        show()

    show()
    if pushed:
        try:
            run_jobs(pushed, first, next_step, failed, max_in_flight=2 * per_base * len(by_base), address=cfg.address,
                     on_start=started)
        finally:
            rd.log_timing("residents", "cells", 0.0, 0.0, started=pool.started)
            pool.close()
    if written:  # after the replicas are gone: their resources are the merges' and evaluations' now
        run_jobs(written, first, next_step, failed, max_in_flight=cfg.max_merged_alive, address=cfg.address,
                 on_start=started)
    bar.close()


def _keep_scored_merges(plan: StudyPlan, keys: dict, results: dict, progress: bool) -> list[str]:
    """Merges that keep_merged selects (a selection added once their cells were scored, say) and that are not on
    disk: merged again, nothing evaluated. The cell's key hashes the inputs' content and the merge's settings, so
    the merge is the one scored; where that was written and read back, its fingerprint must also equal the one the
    ledger records (a pushed merge's fingerprint hashes other digests). Returns the errors, one per merge."""
    from mergescale.cluster.study import run_jobs

    rd, cfg = plan.run, plan.config
    todo = {k: c for c, k in keys.items()
            if k in results and plan.keeps(c) and not (rd.path("merged", k) / C.MANIFEST).exists()}
    errors: list[str] = []
    if not todo:
        return errors
    bar = _bar(len(todo), "merges to keep", "merge", progress)

    def done(key, step, res):
        bar.update(1)
        scored = json.loads(rd.path("manifests", f"{key}.json").read_text())
        recorded = {r["model_fingerprint"] for r in results[key]}
        if "pushed" not in scored and recorded != {res["fingerprint"]}:
            shutil.rmtree(rd.path("merged", key), ignore_errors=True)
            errors.append(f"{todo[key].name}: merged again, its checkpoint has fingerprint {res['fingerprint']}, "
                          f"not the {', '.join(sorted(recorded))} that was scored; removed")
        return None

    def failed(key, step, err):
        bar.update(1)
        errors.append(f"{todo[key].name}: {err.splitlines()[0][:300]}")

    run_jobs(list(todo), lambda key: _merge_step(plan, todo[key], key), done, failed,
             max_in_flight=cfg.max_merged_alive, address=cfg.address)
    bar.close()
    return errors


def _merge_step(plan: StudyPlan, cell, key: str):
    """A cell's merge written to merged/<key>/ (a Ray task; with merge.workers its actors hold the resources)."""
    from mergescale.cluster.study import Step

    ms = plan.config.merge
    cpus, gpus = (ms.num_cpus, ms.num_gpus) if ms.workers is None else (0.0, 0.0)
    return Step(C.merge_model, (C.merge_config(plan, cell), str(plan.run.path("merged", key)), ms.workers), cpus,
                gpus, name=f"merge {cell.name}")


def merge_identity(config: dict) -> dict:
    """What decides a merge's weights, from its MergeConfig dict, normalized (defaults filled in, paths resolved):
    the base, the experts and their weights in order, the method, its parameters, the DARE seed, the output dtype."""
    from mergescale.config import MergeConfig
    from mergescale.merge.methods import METHODS

    c = MergeConfig.model_validate({k: v for k, v in config.items() if k in MergeConfig.model_fields})
    return {"base": str(Path(c.base).resolve()) if c.base else None,
            "experts": [[str(Path(e.path).resolve()), e.weight] for e in c.experts], "method": c.method,
            "parameters": METHODS[c.method].params.model_validate(c.parameters).model_dump(mode="json"),
            "seed": c.seed, "out_dtype": c.out_dtype}


def _check_pushed(config: dict, manifest: dict, cell: str) -> None:
    """The pushed model's manifest is the cell's merge (inputs, weights, method, parameters, seed): its scores are
    the cell's."""
    got, want = merge_identity(manifest["config"]), merge_identity(config)
    diff = sorted(k for k in want if got[k] != want[k])
    if diff:
        raise StudyError(f"cell {cell}: the resident replica scored another merge than the cell's ("
                         + "; ".join(f"{k}: {got[k]} instead of {want[k]}" for k in diff) + ")")


def _write_ledger(plan: StudyPlan, keys: dict, results: dict, refs: dict) -> list[dict]:
    rd = plan.run
    mt_cells = [(c, None) for c in plan.multitask_cells]
    rows = ledger_rows(plan.config.name, mergescale.__version__, list(keys.items()) + mt_cells, results, refs)
    failures = rd.failures()
    running = rd.running()
    cell_rows = []
    for c, k in list(keys.items()) + mt_cells:
        status = "done" if (k is None or k in results) else "failed" if k in failures else \
            "running" if k in running else "pending"
        cell_rows.append({"base": c.base, "kind": c.kind, "size": c.size, "method": c.method,
                          "method_name": c.method_name, "n_experts": c.n_experts, "seed": c.seed,
                          "categories": list(c.categories), "cell_key": k, "status": status,
                          "error": failures[k]["error"] if status == "failed" else None})
    write_ledger(rd, rows, cell_rows)
    return rows


# -- output ----------------------------------------------------------------------------------------------------------
def _bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def print_summary(rows: list[dict], plan: StudyPlan, done: int, failed: dict) -> None:
    """Mean normalized performance per (base, method, N), held-in and held-out: the report's tables in brief."""
    summary = summarize(rows)
    by = {(s["base"], s["method"], s["n_experts"], s["group"]): s for s in summary}
    ns = plan.config.num_experts
    labels = [m.label for m in plan.config.methods] + [MULTITASK_LABEL]
    print(f"\n{done} of {len(plan.cells)} cells done, {len(failed)} failed; ledger: {plan.run.path('ledger.parquet')}")
    for group in ("held_in", "held_out"):
        print(f"\naverage normalized performance, {group.replace('_', '-')} (mean over seeds)")
        head = f"{'base':<18}{'method':<18}" + "".join(f"{'N=' + str(n):>8}" for n in ns)
        print(head)
        for b in plan.config.bases:
            for label in labels:
                vals = [by.get((b.name, label, n, group)) for n in ns]
                if not any(vals):
                    continue
                print(f"{b.name[:17]:<18}{label[:17]:<18}" +
                      "".join(f"{v['mean']:>8.3f}" if v else f"{'-':>8}" for v in vals))
    for k, f in failed.items():
        print(f"failed: {', '.join(f['cells'])} ({f['stage']}): {f['error'].splitlines()[0][:200]}")


def _report(root: Path, progress: bool) -> dict:
    from mergescale.study.report import write_report

    paths = write_report(root)
    return {k: str(p) for k, p in paths.items() if k in ("markdown", "html")}
