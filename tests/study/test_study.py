"""`mergescale study`: the paper's grid as one command, on tiny models and fixture data.

One tiny study (2 bases of different kinds, 4 categories, 2 methods, N in {2, 4}, 2 seeds; one expert and a
multitask model trained by the study) runs once per module in a subprocess (the CLI, its own Ray); the other tests
read its run directory or start from it: a cell checked against `mergescale merge` + `mergescale eval` by hand, a
study killed mid-run and resumed, a grown grid, a failing cell, bad configs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean

import pyarrow.parquet as pq
import pytest
import yaml

from mergescale.cli import main
from mergescale.study.grid import categories_for, seed_order
from mergescale.tiny import STUDY_CATEGORIES, build_study_fixture

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CLI = [sys.executable, "-m", "mergescale.cli"]
# columns that differ between two runs of the same study (wall times)
TIMING = ("merge_s", "eval_s")


def study_cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([*CLI, "study", *map(str, args)], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"study {' '.join(map(str, args))} exited "
                             f"{r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def write_config(cfg: dict, path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**cfg, **changes}, sort_keys=False))
    return path


def ledger(run_dir: Path) -> list[dict]:
    rows = pq.read_table(run_dir / "ledger.parquet").to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in rows),
                  key=lambda r: (r["base"], r["method"], r["n_experts"], r["seed"], r["task"]))


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in (json.loads(x) for x in (run_dir / "timings.jsonl").read_text().splitlines())
            if e["kind"] == kind]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = build_study_fixture(root, n_examples=12, trained={"tiny-it": ["sentiment"]}, multitask=("tiny-it",))
    return root, cfg


@pytest.fixture(scope="module")
def full_run(tiny):
    root, cfg = tiny
    path = write_config(cfg, root / "study.yaml")
    r = study_cli("run", path, "--no-report")
    return Path(cfg["work_dir"]), cfg, r


def test_tiny_study_completes_with_the_paper_metric(full_run):
    run_dir, cfg, r = full_run
    assert "16 of 16 cells done, 0 failed" in r.stdout
    rows = ledger(run_dir)
    held_out = ["copa", "hellaswag", "anli", "rte", "wsc", "winogrande", "wic"]
    tasks_of = {"multiple_choice_qa": ["dream", "cosmos_qa"], "paraphrase_identification": ["mrpc", "qqp"],
                "sentiment": ["app_reviews", "imdb"], "topic_classification": ["ag_news", "dbpedia_14"]}
    cells = {(x["base"], x["method"], x["n_experts"], x["seed"]) for x in rows}
    # 2 bases x 2 methods x 2 N x 2 seeds, and the multitask model's row on tiny-it for each (N, seed)
    assert len(cells) == 16 + 4
    for cell in cells:
        mine = [x for x in rows if (x["base"], x["method"], x["n_experts"], x["seed"]) == cell]
        cats = categories_for(cell[3], cell[2], list(STUDY_CATEGORIES))
        assert sorted(x["task"] for x in mine) == sorted([t for c in cats for t in tasks_of[c]] + held_out)
        for x in mine:  # the paper's metric: held-in / the category's expert, held-out / the base
            assert x["reference"] == (f"expert:{x['category']}" if x["group"] == "held_in" else "base")
            assert x["normalized"] == x["score"] / x["reference_score"]
            assert list(x["categories"]) == list(cats)
    # reference scores come from exactly one evaluation of each reference model
    refs = {(x["base"], x["reference"], x["task"]): x["reference_score"] for x in rows}
    assert len(refs) == len({(k[0], k[1], k[2]) for k in refs})
    # evaluations run = the plan's: 2 bases + 8 experts + 1 multitask model, and one per distinct merge (12:
    # at N=4 both seeds merge all 4 categories, so TIES and Task Arithmetic share those merges across seeds)
    assert len(events(run_dir, "eval")) == 11 + 12
    assert len(events(run_dir, "merge")) == 12
    assert len(events(run_dir, "train")) == 2
    status = {x["status"] for x in pq.read_table(run_dir / "cells.parquet").to_pylist()}
    assert status == {"done"}
    # provenance: resolved config, version, every merge's manifest; no merged checkpoint left (keep_merged: none)
    assert yaml.safe_load((run_dir / "study.yaml").read_text())["name"] == "tiny-study"
    assert json.loads((run_dir / "run.json").read_text())["mergescale_version"]
    keys = {x["cell_key"] for x in rows if x["method"] != "Multitask"}
    assert {p.stem for p in (run_dir / "manifests").glob("*.json")} == keys
    assert not list(run_dir.glob("merged/*"))
    # the hf backend takes pushed merges: every cell merged into its base's resident replica, nothing written
    assert all(e.get("pushed") for e in events(run_dir, "merge"))
    assert events(run_dir, "residents")[0]["started"] == 2
    loads = events(run_dir, "replica_load")  # each replica's load of its base is timed, once
    assert len(loads) == 2 and all(e["end"] > e["start"] for e in loads)
    # an evaluation's span holds its setup in the worker (the benchmark reports the overhead both ways)
    assert all(0.0 <= e["setup_s"] <= e["end"] - e["start"] for e in events(run_dir, "eval"))
    assert any(e["setup_s"] > 0.0 for e in events(run_dir, "eval"))


def test_seed_rule_is_shared_by_every_base_and_method(full_run):
    run_dir, cfg, _ = full_run
    by = {}
    for c in pq.read_table(run_dir / "cells.parquet").to_pylist():
        by.setdefault((c["n_experts"], c["seed"]), set()).add(tuple(c["categories"]))
    for (n, seed), subsets in by.items():
        assert subsets == {categories_for(seed, n, list(STUDY_CATEGORIES))}, (n, seed)
    cats = ["a", "b", "c", "d", "e", "f"]
    for seed in range(20):
        # a pure function of (seed, N, the set of categories): order of the list does not matter; subsets nest
        assert categories_for(seed, 3, cats) == categories_for(seed, 3, cats[::-1])
        assert set(categories_for(seed, 2, cats)) < set(categories_for(seed, 4, cats))
        assert categories_for(seed, 6, cats) == tuple(cats)
    assert len({categories_for(s, 2, cats) for s in range(20)}) > 5  # seeds do pick different subsets
    want = sorted(cats, key=lambda c: __import__("hashlib").sha256(f"0:{c}".encode()).hexdigest())
    assert seed_order(0, cats) == want
    with pytest.raises(ValueError):
        categories_for(0, 7, cats)


def test_a_cell_equals_merge_and_eval_by_hand(full_run, tmp_path, capsys):
    run_dir, cfg, _ = full_run
    base, cats = "tiny-pt", categories_for(1, 2, list(STUDY_CATEGORIES))
    experts = cfg["experts"][base]
    data = cfg["eval"]["data_dir"]
    merge_cfg = {"base": cfg["bases"][0]["path"], "experts": [experts[c] for c in cats], "method": "ties",
                 "parameters": {"density": 0.2, "trim_scope": "global"}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(merge_cfg))
    assert main(["merge", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "merged"), "-q"]) == 0

    def scores(model, tasks, name):
        assert main(["eval", str(model), "--tasks", ",".join(tasks), "--data-dir", data, "--out", str(tmp_path / name),
                     "-q"]) == 0
        return {m["task"]: m["score"] for m in json.loads((tmp_path / name / "metrics.json").read_text())}

    held_in = {c: {"sentiment": ["app_reviews", "imdb"], "topic_classification": ["ag_news", "dbpedia_14"],
                   "multiple_choice_qa": ["dream", "cosmos_qa"],
                   "paraphrase_identification": ["mrpc", "qqp"]}[c] for c in cats}
    held_out = ["copa", "hellaswag", "anli", "rte", "wsc", "winogrande", "wic"]
    merged = scores(tmp_path / "merged", [t for c in cats for t in held_in[c]] + held_out, "merged")
    ref = scores(cfg["bases"][0]["path"], held_out, "base")
    for c in cats:
        ref.update(scores(experts[c], held_in[c], f"expert-{c}"))
    norm = {t: merged[t] / ref[t] for t in merged}
    want_in = fmean(fmean(norm[t] for t in held_in[c]) for c in cats)
    held_out = (["copa", "hellaswag"], ["anli", "rte"], ["wsc", "winogrande"], ["wic"])
    want_out = fmean(fmean(norm[t] for t in ts) for ts in held_out)
    rows = [x for x in ledger(run_dir) if (x["base"], x["method"], x["n_experts"], x["seed"]) == (base, "TIES", 2, 1)]
    assert {x["task"]: x["normalized"] for x in rows} == pytest.approx(norm, abs=0, rel=1e-12)
    from mergescale.eval.aggregate import cell_scores

    got = {k[-1]: v for k, v in cell_scores(rows).items()}
    assert got["held_in"] == pytest.approx(want_in, rel=1e-12)
    assert got["held_out"] == pytest.approx(want_out, rel=1e-12)


def test_killed_study_resumes_to_the_same_ledger(full_run, tmp_path):
    run_dir, cfg, _ = full_run
    # the trained models of the full run, given by path: the same content, so the same cell keys
    trained = Path(cfg["work_dir"]) / "models" / "tiny-it"
    experts = {**cfg["experts"], "tiny-it": {**cfg["experts"]["tiny-it"],
                                             "sentiment": str(trained / "experts" / "sentiment")}}
    path = write_config(cfg, tmp_path / "study.yaml", work_dir=str(tmp_path / "run"), experts=experts,
                        multitask={"tiny-it": str(trained / "multitask")})
    killed = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "study", "run", str(path), "--no-report", "-q"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and len(list((killed / "results").glob("*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (killed / "results").glob("*.parquet")}
    assert 3 <= len(before) < 12, "the study must be killed mid-run"
    st = study_cli("status", killed).stdout
    assert f"{len(before)} done" in st, st
    in_flight = {p.stem for p in (killed / "running").glob("*.json")}
    planned = json.loads((killed / "plan.json").read_text())["cells"]
    assert st.count("interrupted in its") == sum(c["key"] in in_flight for c in planned), st  # the driver is gone
    t_rerun = time.time()
    study_cli("run", path, "--no-report", "-q")
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (killed / "results").glob("*.parquet")}
    assert {k: after[k] for k in before} == before  # finished cells were not redone
    rerun_merges = {e["key"] for e in events(killed, "merge") if e["start"] >= t_rerun}
    assert rerun_merges == {p[: -len(".parquet")] for p in after} - {p[: -len(".parquet")] for p in before}
    assert ledger(killed) == ledger(run_dir)
    assert not list((killed / "running").glob("*.json"))


def test_adding_a_seed_runs_only_the_new_cells(full_run, tmp_path):
    run_dir, cfg, _ = full_run
    grown = tmp_path / "run"
    shutil.copytree(run_dir, grown)  # the same study, grown by a seed
    path = write_config(cfg, tmp_path / "study.yaml", work_dir=str(grown), seeds=[0, 1, 2])
    t0 = time.time()
    r = study_cli("run", path, "--no-report")
    assert "24 of 24 cells done" in r.stdout
    new_merges = [e for e in events(grown, "merge") if e["start"] >= t0]
    new_evals = [e for e in events(grown, "eval") if e["start"] >= t0]
    assert len(events(grown, "train")) == 2  # the trained models were reused
    # seed 2 at N=2 picks new subsets (2 bases x 2 methods); at N=4 every seed merges all 4 categories: shared
    assert len(new_merges) == 4 and len(new_evals) == 4
    rows = ledger(grown)
    old = ledger(run_dir)
    assert [x for x in rows if x["seed"] != 2] == old
    n4 = {(x["base"], x["method"], x["task"], x["seed"]): x["normalized"] for x in rows if x["n_experts"] == 4}
    assert all(v == n4[k[:3] + (0,)] for k, v in n4.items())


def test_a_failing_cell_is_recorded_and_the_study_goes_on(tiny, tmp_path):
    root, cfg = tiny
    from safetensors.torch import load_file, save_file

    # an expert with a NaN in the <unk> row of its embedding: its own evaluation never reads the row, a merge
    # refuses it (on_nonfinite: error)
    src = Path(cfg["experts"]["tiny-pt"]["sentiment"])
    bad = shutil.copytree(src, tmp_path / "bad-expert")
    for f in bad.glob("*.safetensors"):
        sd = load_file(f)
        if "model.embed_tokens.weight" in sd:
            sd["model.embed_tokens.weight"][0, 0] = float("nan")
            save_file(sd, f, metadata={"format": "pt"})
    cats = ["sentiment", "topic_classification"]
    experts = {"tiny-pt": {"sentiment": str(bad),
                           "topic_classification": cfg["experts"]["tiny-pt"]["topic_classification"]}}
    path = write_config(cfg, tmp_path / "s.yaml", name="nan-study", work_dir=str(tmp_path / "run"), held_in=cats,
                        bases=[cfg["bases"][0]], experts=experts, multitask={}, num_experts=[1, 2], seeds=[0],
                        methods=[cfg["methods"][0]])
    r = study_cli("run", path, "--no-report", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "1 of 2 cells done, 1 failed" in r.stdout  # seed 0's N=1 cell merges topic_classification alone
    assert categories_for(0, 1, cats) == ("topic_classification",)
    cells = pq.read_table(tmp_path / "run" / "cells.parquet").to_pylist()
    failed = [c for c in cells if c["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["n_experts"] == 2
    assert "model.embed_tokens.weight" in failed[0]["error"] and "non-finite" in failed[0]["error"].lower()
    assert {x["n_experts"] for x in ledger(tmp_path / "run")} == {1}  # no row of the failed cell
    st = study_cli("status", tmp_path / "run").stdout
    assert "1 done" in st and "1 failed" in st and "model.embed_tokens.weight" in st


BAD = {
    "expert path": (lambda c: c["experts"]["tiny-pt"].update(sentiment="/nonexistent/expert"),
                    "experts.tiny-pt.sentiment"),
    "too many experts": (lambda c: c.update(num_experts=[2, 5]), "num_experts: 5 is more than the 4"),
    "duplicate label": (lambda c: c["methods"].append(dict(c["methods"][0])), "labels must be unique"),
    "unknown category": (lambda c: c.update(held_in=["sentiment", "nope"]), "held_in: unknown held-in category 'nope'"),
    "held-out task": (lambda c: c.update(held_out=["copa", "imdb"]), "held_out: imdb is a held-in task"),
    "unknown task": (lambda c: c.update(held_out=["copa", "nope"]), "held_out: unknown task or selector 'nope'"),
    "missing data": (lambda c: c["eval"].update(data_dir="/nonexistent/data"), "no local data for split"),
    "bad parameter": (lambda c: c["methods"][1]["parameters"].update(density=1.5), "parameters.density"),
    "unknown base": (lambda c: c["experts"].update(other={}), "experts: other is not a base name"),
    "missing expert": (lambda c: c["experts"]["tiny-pt"].pop("sentiment"), "experts.tiny-pt: no expert for held-in "
                                                                           "category sentiment"),
    "wrong layout": (lambda c: c["experts"]["tiny-pt"].update(sentiment=c["bases"][1]["path"] + "/../../micro"),
                     "experts.tiny-pt.sentiment"),
    "train spec": (lambda c: c["experts"]["tiny-pt"].update(sentiment={"train": {"max_steps": 0}}),
                   "experts.tiny-pt.sentiment (train spec"),
    "slerp with 4": (lambda c: c["methods"].append({"label": "SLERP", "method": "slerp"}),
                     "methods.SLERP: 'slerp' cannot merge 4 experts"),
    "keep selector": (lambda c: c.update(keep_merged=[{"n_experts": 2}, {"method": "TIESS"}]),
                      "keep_merged.1.method: 'TIESS' selects no cell"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_fails_before_anything_runs(tiny, tmp_path, capsys, case):
    root, cfg = tiny
    cfg = json.loads(json.dumps({**cfg, "work_dir": str(tmp_path / "run")}))
    if case == "wrong layout":  # a model with other tensors than the base
        from mergescale.tiny import build_tiny_llama

        build_tiny_llama(root / "micro", hidden=32, heads=1, layers=1)
    mutate, message = BAD[case]
    mutate(cfg)
    path = write_config(cfg, tmp_path / "s.yaml")
    for command in ("plan", "run"):
        assert main(["study", command, str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert not (tmp_path / "run").exists()


def test_an_expert_replaced_in_place_changes_exactly_its_cells_keys(tmp_path):
    """Keys hash the experts' content, not their paths or headers: other weights of the same layout written over an
    expert give new keys to the cells that merge it (so no stale result is reused), and to no other cell."""
    from mergescale.study.cells import Digests, cell_key
    from mergescale.study.plan import make_plan
    from mergescale.tiny import make_expert

    cfg = build_study_fixture(tmp_path, n_examples=4)
    path = write_config(cfg, tmp_path / "s.yaml")
    plan = make_plan(path)
    before = {c: cell_key(plan, c, Digests(tmp_path / "d1.json")) for c in plan.cells}
    target = Path(cfg["experts"]["tiny-pt"]["sentiment"])
    other = make_expert(cfg["bases"][0]["path"], tmp_path / "other", seed=999, max_shard_size="400KB")
    for f in other.glob("*.safetensors"):
        assert (target / f.name).stat().st_size == f.stat().st_size  # same layout, same file sizes
        shutil.copyfile(f, target / f.name)
    digests, plan2 = Digests(tmp_path / "d2.json"), make_plan(path)
    after = {c: cell_key(plan2, c, digests) for c in plan2.cells}
    for c in plan.cells:
        touched = c.base == "tiny-pt" and "sentiment" in c.categories
        assert (before[c] != after[c]) == touched, c.name
    assert len(set(before.values())) == len(plan.unique_merges())  # equal keys exactly where merges are shared


def test_the_python_api_plans_the_same_study_twice(tmp_path):
    """`study.plan(config)` as the README shows it, twice in one fresh process: importing the submodule
    mergescale.study.plan must not replace the function."""
    cfg = build_study_fixture(tmp_path, n_examples=4)
    path = write_config(cfg, tmp_path / "s.yaml")
    code = ("import sys; from mergescale import study; a = study.plan(sys.argv[1]); b = study.plan(sys.argv[1]); "
            "print(len(a.cells), len(b.cells))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["16", "16"]


def test_the_ray_job_entry_runs_study_commands(full_run, capsys):
    """`ray job submit ... -- python -m mergescale.cluster.job study ...` runs the study CLI; plan and status need no
    cluster, so they run here through the same entry point."""
    from mergescale.cluster.job import main as job_main

    run_dir, cfg, _ = full_run
    assert job_main(["study", "status", str(run_dir)]) == 0
    assert "16 cells: 16 done" in capsys.readouterr().out
    cfg_path = run_dir.parent / "study.yaml"
    assert job_main(["study", "plan", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "16 cells, 12 merges" in out
    assert "N=2 seed=0: " + ", ".join(categories_for(0, 2, list(STUDY_CATEGORIES))) in out


def test_a_pushed_merge_is_checked_against_the_cells_parameters_and_seed():
    """A resident replica's result counts for a cell only if its manifest is the cell's merge. Before, only the method
    and the experts' paths were compared: a push of the same experts with another density, lambda or DARE seed
    would have been recorded as the cell's scores."""
    from mergescale.config import MergeConfig
    from mergescale.study.ledger import StudyError
    from mergescale.study.runner import _check_pushed

    cell = {"base": "/m/base", "experts": ["/m/a", "/m/b"], "method": "ties", "parameters": {"density": 0.2},
            "seed": 0, "cluster": {"workers": 1}}

    def manifest(**change):
        return {"config": MergeConfig.model_validate({**cell, **change}).model_dump(mode="json")}

    _check_pushed(cell, manifest(), "c")  # the same merge, its defaults filled in on one side only
    _check_pushed(cell, manifest(parameters={"density": 0.2, "lambda": 1.0}), "c")  # lambda's default, spelled out
    for change, field in (({"parameters": {"density": 0.5}}, "parameters"), ({"seed": 1}, "seed"),
                          ({"experts": ["/m/b", "/m/a"]}, "experts"), ({"method": "dare_ties"}, "method"),
                          ({"base": "/m/other"}, "base")):
        with pytest.raises(StudyError, match=f"cell c: .*{field}: "):
            _check_pushed(cell, manifest(**change), "c")


def test_kept_merges_are_the_selected_cells_and_every_cell_sharing_their_merge(tmp_path):
    """keep_merged: [selectors]: a merge is kept (and so written, not pushed) when any cell sharing it matches;
    `study plan` counts the bytes of those merges only."""
    from mergescale.study.plan import make_plan

    cfg = build_study_fixture(tmp_path, n_examples=4)
    cfg["keep_merged"] = [{"method": "TIES", "seed": 1}, {"base": "tiny-pt", "n_experts": 2, "seed": 0}]
    plan = make_plan(cfg)
    assert plan.config.pushes  # hf, one replica: the other cells go by push

    def selected(c):  # the selectors, written out
        return (c.method == "TIES" and c.seed == 1) or (c.base == "tiny-pt" and c.n_experts == 2 and c.seed == 0)

    for c in plan.cells:
        shared = [x for x in plan.cells if plan.merge_identity(x) == plan.merge_identity(c)]
        assert plan.keeps(c) == any(selected(x) for x in shared), c.name
        assert plan.pushes(c) == (not plan.keeps(c)), c.name
    # TIES at N = 4 merges all 4 categories for both seeds: one merge, kept for seed 0 through seed 1's selector
    n4 = [c for c in plan.cells if c.method == "TIES" and c.n_experts == 4 and c.seed == 0]
    assert n4 and all(plan.keeps(c) and not selected(c) for c in n4)
    kept = [c for c in plan.unique_merges() if plan.keeps(c)]
    assert 0 < len(kept) < len(plan.unique_merges())
    from mergescale.merge.inputs import human_bytes

    want = human_bytes(sum(plan.model_bytes[c.base] for c in kept))
    assert f"bytes to write    {want} merged ({len(plan.unique_merges()) - len(kept)} of " in plan.describe()
