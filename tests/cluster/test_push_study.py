"""A study's cells by push (cluster.resident): one resident replica per base, the same ledger as the cells written
to disk and read back, and a replica that dies or fails its checksum replaced by a fresh one, the cell run again
there. In-process studies (their own Ray): listed in OWN_RAY_SESSION in tests/conftest.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

from mergescale import study
from mergescale.checkpoint.output_dir import MANIFEST
from mergescale.cluster import resident
from mergescale.study.ledger import StudyError
from mergescale.tiny import build_study_fixture

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FlakyReplica runs in Ray workers


class FlakyReplica(resident.ResidentReplica):
    """A replica that fails the study's first two pushes, counted in a directory all replicas share: the first by
    dying (its process exits), the second by a row corrupted after the merge hashed it (the checksum's case)."""

    calls_dir: str = ""

    def push_model(self, config, tasks, out, settings, workers=None):
        calls = Path(self.calls_dir)
        n = len(list(calls.iterdir()))
        (calls / f"{n}-{os.getpid()}").touch()
        if n == 0:
            os._exit(1)
        if n == 1:
            real = self.resident.load_rows

            def corrupting(name, row_start, data, code):
                if row_start == 0 and name.endswith("mlp.up_proj.weight"):
                    data = data.copy()
                    data[1] ^= 4
                return real(name, row_start, data, code)

            self.resident.load_rows = corrupting
        return super().push_model(config, tasks, out, settings, workers)


def small_study(root: Path, name: str, **changes) -> dict:
    cfg = build_study_fixture(root / "fixture", n_examples=6)
    cats = ["sentiment", "topic_classification"]
    base = cfg["bases"][0]
    cfg.update(name=name, work_dir=str(root / name), bases=[base], held_in=cats, held_out=["copa", "rte"],
               experts={base["name"]: {c: cfg["experts"][base["name"]][c] for c in cats}}, multitask={},
               num_experts=[1, 2], seeds=[0], methods=[cfg["methods"][1]])
    for k, v in changes.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def scores(run_dir: str) -> dict:
    rows = pq.read_table(Path(run_dir) / "ledger.parquet").to_pylist()
    return {(r["n_experts"], r["task"]): r["score"] for r in rows}


def timings(run_dir: str, kind: str) -> list[dict]:
    lines = (Path(run_dir) / "timings.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict:
    """The small study with its cells written to disk and read back: the scores a push must give."""
    run = study.run(small_study(tmp_path_factory.mktemp("disk"), "disk", merge={"push": "never"}), progress=False,
                    report=False)
    assert run["done"] == 2 and not any(e.get("pushed") for e in timings(run["run_dir"], "merge"))
    return run


def test_push_cells_score_as_disk_cells_and_survive_replica_faults(tmp_path, monkeypatch, disk):
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setattr(FlakyReplica, "calls_dir", str(calls))
    monkeypatch.setattr(resident, "ResidentReplica", FlakyReplica)
    # one replica for the base (max_merged_alive 1), with both cells queued on it
    pushed = study.run(small_study(tmp_path, "push", max_merged_alive=1), progress=False, report=False)
    assert pushed["done"] == 2 and pushed["failed"] == 0
    # two cells in flight on the base's replica: both fail when it dies and run again on a second one, whose
    # corrupted push fails its checksum (the other cell's call there fails with it, or is lost with the replica);
    # both run again on a third replica, where both are scored
    made = sorted(calls.iterdir(), key=lambda p: int(p.name.split("-")[0]))
    pids = [p.name.split("-")[1] for p in made]
    assert len(set(pids)) == 3 and pids[-1] == pids[-2] != pids[-3]
    assert timings(pushed["run_dir"], "residents")[0]["started"] == 3
    assert all(e["pushed"] for e in timings(pushed["run_dir"], "merge"))
    assert not list((Path(pushed["run_dir"]) / "merged").glob("*/*.safetensors"))
    assert scores(pushed["run_dir"]) == scores(disk["run_dir"])  # every score of the cell's own merge, exactly


def test_cells_merged_by_actors_push_into_the_replica_and_score_as_disk_cells(tmp_path, disk):
    """merge.workers 2: each cell's merge runs on two Ray merge actors that send their rows to the base's replica.
    The pool starts no second replica that would leave the actors no room on this 2-CPU Ray."""
    pushed = study.run(small_study(tmp_path, "actors", merge={"workers": 2, "num_cpus": 0.5}), progress=False,
                       report=False)
    assert pushed["done"] == 2 and pushed["failed"] == 0
    for m in (Path(pushed["run_dir"]) / "manifests").glob("*.json"):
        manifest = json.loads(m.read_text())
        assert "pushed" in manifest and manifest["distributed"]["workers"] == 2
        assert sum(a["units"] for a in manifest["distributed"]["actors"]) == manifest["plan"]["units"]
    assert timings(pushed["run_dir"], "residents")[0]["started"] == 1
    assert not list((Path(pushed["run_dir"]) / "merged").glob("*/*.safetensors"))
    assert scores(pushed["run_dir"]) == scores(disk["run_dir"])


def test_merge_actors_that_cannot_fit_beside_the_replicas_fail_before_any_cell(tmp_path, disk):
    """Replicas hold their CPUs for the whole study: a merge whose actors cannot be placed beside them would wait
    forever. The study says so, naming the fields, before any cell is started."""
    from mergescale.study.ledger import StudyError

    cfg = small_study(tmp_path, "too-big", merge={"workers": 2, "num_cpus": 1000.0})
    with pytest.raises(StudyError, match=r"merge\.workers x merge\.num_cpus = 2000 CPUs"):
        study.run(cfg, progress=False, report=False)
    assert timings(cfg["work_dir"], "merge") == []  # no cell's merge started
    assert list((Path(cfg["work_dir"]) / "references").glob("*.parquet"))  # the references ran first, as always
    assert not list(Path(cfg["work_dir"]).glob("results/*.parquet"))


def test_a_kept_merge_is_written_and_the_others_pushed(tmp_path, disk):
    """keep_merged: [{n_experts: 2}] in a push study: that cell's merge is written by the normal path and stays,
    a complete checkpoint (every shard's sha256 as its manifest says, and the fingerprint the ledger records), the
    other cell is pushed; both score as the disk run."""
    run = study.run(small_study(tmp_path, "keep", keep_merged=[{"n_experts": 2}]), progress=False, report=False)
    assert run["done"] == 2 and run["failed"] == 0
    root = Path(run["run_dir"])
    key = {c["cell"].split("/")[2]: c["key"] for c in json.loads((root / "plan.json").read_text())["cells"]}
    merges = {e["key"]: e for e in timings(run["run_dir"], "merge")}
    assert merges[key["N=1"]]["pushed"] and not merges[key["N=2"]].get("pushed")
    assert [p.name for p in (root / "merged").iterdir()] == [key["N=2"]]
    kept = root / "merged" / key["N=2"]
    manifest = json.loads((kept / MANIFEST).read_text())
    digests = {}
    for name, shard in sorted(manifest["outputs"].items()):
        digests[name] = hashlib.sha256((kept / name).read_bytes()).hexdigest()
        assert digests[name] == shard["sha256"], name
    fingerprint = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:32]
    rows = pq.read_table(root / "ledger.parquet").to_pylist()
    assert {r["model_fingerprint"] for r in rows if r["n_experts"] == 2} == {fingerprint}
    assert scores(run["run_dir"]) == scores(disk["run_dir"])


def test_a_merge_kept_after_its_cell_was_scored_is_merged_again(tmp_path, disk):
    """keep_merged added to a finished study: the rerun merges the selected cells again to disk and evaluates
    nothing. Their merge is the one scored: a cell written and read back the first time must have the fingerprint
    the ledger records (else an error, and the checkpoint removed); a pushed cell's checkpoint is the disk run's."""
    def evals(run):
        return len(timings(run["run_dir"], "eval"))

    for name, merge in (("disk", {"push": "never"}), ("push", {})):
        cfg = small_study(tmp_path, name, merge=merge)
        first = study.run(cfg, progress=False, report=False)
        root = Path(first["run_dir"])
        assert first["done"] == 2 and not list((root / "merged").glob("*"))
        again = study.run({**cfg, "keep_merged": [{"n_experts": 2}]}, progress=False, report=False)
        assert again["done"] == 2 and evals(again) == evals(first)  # nothing evaluated again
        key = {c["cell"].split("/")[2]: c["key"] for c in json.loads((root / "plan.json").read_text())["cells"]}
        assert [p.name for p in (root / "merged").glob("*")] == [key["N=2"]]
        assert scores(again["run_dir"]) == scores(disk["run_dir"])
        # the checkpoint is the disk run's merge of that cell, byte for byte
        kept = json.loads((root / "merged" / key["N=2"] / MANIFEST).read_text())["outputs"]
        disk_rows = pq.read_table(Path(disk["run_dir"]) / "ledger.parquet").to_pylist()
        shards = {n: s["sha256"] for n, s in sorted(kept.items())}
        assert {r["model_fingerprint"] for r in disk_rows if r["n_experts"] == 2} == {
            hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:32]}

    # a written cell whose recorded fingerprint is not the merge's: refused, nothing kept
    root = tmp_path / "disk"
    shutil.rmtree(root / "merged" / key["N=2"])
    results = root / "results" / f"{key['N=2']}.parquet"
    table = pq.read_table(results)
    fp = table.column_names.index("model_fingerprint")
    pq.write_table(table.set_column(fp, "model_fingerprint", pa.array(["0" * 32] * table.num_rows)), results)
    with pytest.raises(StudyError, match="not the 0{32} that was scored"):
        study.run({**small_study(tmp_path, "disk", merge={"push": "never"}), "keep_merged": [{"n_experts": 2}]},
                  progress=False, report=False)
    assert not list((root / "merged").glob("*"))
