"""The study report: tables equal to the paper's from a ledger built to give them, the aggregation and the paired
bootstrap against computations written here, and a partial or bad ledger."""

from __future__ import annotations

import csv
import io
import math
from statistics import fmean, stdev

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergescale.eval.aggregate import summary_weights
from mergescale.study import bootstrap
from mergescale.study.config import MULTITASK_LABEL
from mergescale.study.ledger import StudyError, read_ledger
from mergescale.study.report import write_report
from mergescale.study.summary import build_summary, load_summary
from mergescale.study.synthetic import (
    PAPER_BASES,
    PAPER_METHODS,
    SynthTask,
    paper_table,
    paper_value,
    write_synthetic_run,
)
from mergescale.study.tables import build_tables, table_csv, table_markdown

# eight held-in categories (the paper's N goes to 8) with one or two datasets each, two held-out categories
TASKS = ([SynthTask(f"in{c}_{k}", f"cat{c}", "held_in") for c in range(8) for k in range(1 + c % 2)]
         + [SynthTask("out_a1", "out_a", "held_out"), SynthTask("out_a2", "out_a", "held_out"),
            SynthTask("out_b1", "out_b", "held_out")])


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("paper")
    write_synthetic_run(run, paper_value(), bases=PAPER_BASES, methods=PAPER_METHODS, num_experts=[2, 4, 6, 8],
                        seeds=[0, 1, 2], tasks=TASKS, n_examples=4)
    return run


def test_a_ledger_built_to_give_the_papers_tables_gives_them_cell_for_cell(paper_run):
    rows = read_ledger(paper_run)
    seeds_of = {(r["base"], r["method"], r["n_experts"], r["seed"]) for r in rows}
    assert len(seeds_of) == 8 * 5 * 4 * 3  # every cell and seed is there, the Multitask rows too
    summary = load_summary(paper_run, n_boot=0)
    tables = build_tables(summary)
    order = [("instruction_tuned", "held_in"), ("instruction_tuned", "held_out"), ("pretrained", "held_in"),
             ("pretrained", "held_out")]
    assert [(t.number, t.kind, t.group) for t in tables] == [(i + 1, *k) for i, k in enumerate(order)]
    for t in tables:
        paper = paper_table(t.kind, t.group)
        assert t.rows == PAPER_METHODS + [MULTITASK_LABEL]
        # the CSV, cell for cell, to two decimals
        got = list(csv.reader(io.StringIO(table_csv(t))))
        assert got[0] == ["method"] + [f"{s} N={n}" for s in ("1B", "8B", "24B", "64B") for n in (2, 4, 6, 8)]
        for line in got[1:]:
            for head, value in zip(got[0][1:], line[1:]):
                size, n = head.split(" N=")
                assert f"{float(value):.2f}" == f"{paper[(line[0], size, int(n))]:.2f}", (t.title, line[0], head)
        # the Markdown table shows the same strings
        md = table_markdown(t).splitlines()
        for method in t.rows:
            cells = next(x for x in md if x.startswith(f"| {method} |")).strip("| ").split(" | ")[1:]
            assert cells == [f"{paper[(method, s, n)]:.2f}" for s in ("1B", "8B", "24B", "64B") for n in (2, 4, 6, 8)]
    # spot checks against the paper's text itself
    assert paper_table("pretrained", "held_out")[(MULTITASK_LABEL, "64B", 8)] == 1.72
    assert paper_table("instruction_tuned", "held_in")[("Task Arithmetic", "64B", 2)] == 1.00


def _row(base, method, n, seed, task, category, group, normalized, kind="pretrained", size="1B"):
    return {"study": "hand", "base": base, "kind": kind, "size": size, "method": method, "n_experts": n,
            "seed": seed, "task": task, "category": category, "group": group, "normalized": normalized}


def test_aggregation_of_uneven_categories_and_seeds_equals_a_hand_computation():
    # seed 0 merges categories a (3 datasets) and b (1); seed 1 merges b and c (2); seed 2 is not done
    v = {(0, "a1"): 0.9, (0, "a2"): 0.6, (0, "a3"): 0.3, (0, "b1"): 1.2,
         (1, "b1"): 0.8, (1, "c1"): 0.5, (1, "c2"): 0.7}
    rows = [_row("pt", "TIES", 2, s, t, t[0], "held_in", x) for (s, t), x in v.items()]
    rows += [_row("pt", "TIES", 2, s, "o1", "o", "held_out", 1.0 + s / 10) for s in (0, 1)]
    cells = [{"base": "pt", "kind": "pretrained", "size": "1B", "method": "TIES", "n_experts": 2, "seed": s,
              "status": "done" if s < 2 else "pending", "error": None} for s in (0, 1, 2)]
    seed0 = fmean([fmean([0.9, 0.6, 0.3]), 1.2])  # datasets -> category -> seed
    seed1 = fmean([0.8, fmean([0.5, 0.7])])
    s = build_summary(rows, cells).get("pt", "TIES", 2, "held_in")
    assert s.mean == pytest.approx(fmean([seed0, seed1]))
    assert s.std == pytest.approx(stdev([seed0, seed1]))
    assert (s.n_seeds, s.n_planned, s.partial) == (2, 3, True)
    # the bootstrap's weights reproduce the same mean from the rows
    w = summary_weights(rows)[("pt", "pretrained", "1B", "TIES", 2, "held_in")]
    assert sum(x * rows[i]["normalized"] for i, x in w.items()) == pytest.approx(s.mean)
    out = build_summary(rows, cells).get("pt", "TIES", 2, "held_out")
    assert out.mean == pytest.approx(1.05) and out.std == pytest.approx(stdev([1.0, 1.1]))


def test_tasks_of_a_group_of_their_own_get_a_table_not_dropped():
    rows = [_row("pt", "TIES", 2, 0, "mine", "c", "custom", 0.7), _row("pt", "TIES", 2, 0, "t", "c", "held_in", 0.9)]
    tables = build_tables(build_summary(rows, []))
    assert [(t.group, t.stat("TIES", t.bases[0], 2).mean) for t in tables] == [("held_in", 0.9), ("custom", 0.7)]
    assert tables[1].title == "Table 2: pretrained bases, custom tasks: average normalized performance"


def _examples(path, ids, values, column="acc"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"example_id": ids, column: values}), path)


def _boot_rows(tmp_path, merged_of, ref_of, metric="accuracy"):
    """Ledger rows of one cell: two seeds, tasks t1, t2 (category x) and t3 (category y) held-in; per-example
    files from merged_of(seed, task) and ref_of(task)."""
    col = bootstrap.metric_column(metric)
    rows = []
    for seed in (0, 1):
        for task, cat in (("t1", "x"), ("t2", "x"), ("t3", "y")):
            m, r = np.asarray(merged_of(seed, task), float), np.asarray(ref_of(task), float)
            ids = [f"e{i}" for i in range(len(m))]
            _examples(tmp_path / f"m{seed}/{task}.parquet", ids, m, col)
            _examples(tmp_path / f"r/{task}.parquet", ids, r, col)
            rows.append({**_row("pt", "TIES", 2, seed, task, cat, "held_in", m.mean() / r.mean()), "metric": metric,
                         "score": float(m.mean()), "reference_score": float(r.mean()), "cell_key": f"k{seed}",
                         "examples_path": f"m{seed}/{task}.parquet", "reference_examples_path": f"r/{task}.parquet"})
    return rows


def test_bootstrap_equals_a_plain_loop_over_replicates(tmp_path):
    rng = np.random.default_rng(3)
    merged = {(s, t): rng.integers(0, 2, 30) for s in (0, 1) for t in ("t1", "t2", "t3")}
    refs = {t: np.maximum(rng.integers(0, 2, 30), np.arange(30) % 2) for t in ("t1", "t2", "t3")}
    rows = _boot_rows(tmp_path, lambda s, t: merged[(s, t)], refs.get)
    n_boot = 200
    reps = bootstrap.row_replicates(rows, tmp_path, n_boot=n_boot, seed=7)
    w = summary_weights(rows)[("pt", "pretrained", "1B", "TIES", 2, "held_in")]
    lo, hi = bootstrap.interval(reps, w)
    # the same draws, aggregated by hand: per replicate, ratio per (seed, task), mean over the category's tasks,
    # over categories, over seeds
    # (the library orders examples by id: e0, e1, e10, ...; its draws count them in that order)
    by_id = sorted(range(30), key=lambda i: f"e{i}")
    draws = {t: bootstrap.resample_counts(30, n_boot, f"7:{t}:{_digest(30)}") for t in ("t1", "t2", "t3")}
    est = []
    for b in range(n_boot):
        per_seed = []
        for s in (0, 1):
            ratio = {t: sum(draws[t][b][k] * merged[(s, t)][i] for k, i in enumerate(by_id))
                     / sum(draws[t][b][k] * refs[t][i] for k, i in enumerate(by_id)) for t in ("t1", "t2", "t3")}
            per_seed.append(fmean([fmean([ratio["t1"], ratio["t2"]]), ratio["t3"]]))
        est.append(fmean(per_seed))
    est = np.sort(est)
    assert (lo, hi) == pytest.approx((est[math.ceil(0.025 * n_boot) - 1], est[math.ceil(0.975 * n_boot) - 1]))
    point = sum(x * rows[i]["normalized"] for i, x in w.items())
    assert lo <= point <= hi and hi - lo > 0.01
    # a fixed seed gives the same interval; another seed another
    assert bootstrap.interval(bootstrap.row_replicates(rows, tmp_path, n_boot, seed=7), w) == (lo, hi)
    assert bootstrap.interval(bootstrap.row_replicates(rows, tmp_path, n_boot, seed=8), w) != (lo, hi)


def _digest(n):
    import hashlib

    return hashlib.sha256("\0".join(sorted(f"e{i}" for i in range(n))).encode()).hexdigest()


def test_bootstrap_pairs_merged_and_reference_examples(tmp_path):
    # merged = 1.5 x reference on every example: any draw of the same ids gives exactly 1.5; an unpaired draw would not
    base = np.random.default_rng(0).uniform(0.2, 0.8, 25)
    rows = _boot_rows(tmp_path, lambda s, t: 1.5 * base, lambda t: base, metric="rouge_l")
    reps = bootstrap.row_replicates(rows, tmp_path, n_boot=300)
    assert np.allclose(reps, 1.5)
    w = summary_weights(rows)[("pt", "pretrained", "1B", "TIES", 2, "held_in")]
    assert bootstrap.interval(reps, w) == pytest.approx((1.5, 1.5))


def test_resample_counts_are_draws_with_replacement():
    c = bootstrap.resample_counts(50, 400, "k")
    assert c.shape == (400, 50) and (c.sum(axis=1) == 50).all() and (c >= 0).all()
    assert np.array_equal(c, bootstrap.resample_counts(50, 400, "k"))
    assert not np.array_equal(c, bootstrap.resample_counts(50, 400, "other"))
    assert abs(c.mean() - 1.0) < 1e-12 and 0.8 < c.var() < 1.2  # multinomial(50, 1/50): variance ~0.98


def test_bootstrap_refuses_files_that_disagree_with_the_ledger(tmp_path):
    base = np.array([1.0, 0.0, 1.0, 1.0])
    rows = _boot_rows(tmp_path, lambda s, t: base, lambda t: base)
    bad = [dict(r) for r in rows]
    bad[2]["score"] = 0.5
    with pytest.raises(StudyError, match=r"score 0.5 is not the mean of 'acc' in m0/t3.parquet"):
        bootstrap.row_replicates(bad, tmp_path, n_boot=10)
    _examples(tmp_path / "r/t1.parquet", ["e0", "e1", "e2", "x9"], base)
    with pytest.raises(StudyError, match="different example ids"):
        bootstrap.row_replicates(rows, tmp_path, n_boot=10)
    _examples(tmp_path / "r/t1.parquet", ["e0", "e1", "e2", "e3"], base, column="rouge_l")
    with pytest.raises(StudyError, match=r"r/t1.parquet: needs columns example_id and 'acc'"):
        bootstrap.row_replicates(rows, tmp_path, n_boot=10)


def _partial(cell, group):
    """The paper's numbers, with 64B not started, seed 2 of N=4 not done, and N=8 of the 8B pretrained failed."""
    if cell.size == "64B" or (cell.n_experts == 4 and cell.seed == 2):
        return None
    if cell.size == "8B" and cell.kind == "pretrained" and cell.n_experts == 8:
        return None
    return paper_value()(cell, group)


def test_a_partial_ledger_renders_with_missing_cells_shown_as_missing(tmp_path):
    write_synthetic_run(tmp_path, _partial, bases=PAPER_BASES, methods=PAPER_METHODS[:2], num_experts=[2, 4, 8],
                        seeds=[0, 1, 2], tasks=TASKS, n_examples=6, multitask_in_cells=False,
                        failed=lambda c: "CUDA out of memory\ntraceback" if c.size == "8B" and c.n_experts == 8
                        and c.kind == "pretrained" else None)
    out = write_report(tmp_path, n_boot=50)
    md = out["markdown"].read_text()
    # 8 bases x 2 methods x 3 N x 3 seeds = 144 cells (Multitask not listed in cells.parquet here); pending: the 36 of
    # 64B and the 12 of seed 2 at N=4 elsewhere; failed: the 6 of pretrained 8B N=8
    assert "Cells planned: 144 (90 done, 6 failed, 0 running, 48 pending)" in md
    assert ("- CUDA out of memory (6 cells: pt-8b/Average/N=8/seed=0, pt-8b/Task Arithmetic/N=8/seed=0, "
            "pt-8b/Average/N=8/seed=1, pt-8b/Task Arithmetic/N=8/seed=1 and 2 more; cells.parquet lists them)") in md
    assert "traceback" not in md
    table3 = next(p for p in out["tables"] if p.name == "table3_pretrained_held_in.csv")
    lines = {r[0]: r[1:] for r in csv.reader(table3.open())}
    head = lines["method"]
    assert head[-3:] == ["64B N=2", "64B N=4", "64B N=8"]  # planned, never run: columns kept
    for method in PAPER_METHODS[:2] + [MULTITASK_LABEL]:
        row = dict(zip(head, lines[method]))
        assert row["64B N=2"] == row["64B N=8"] == row["8B N=8"] == ""  # empty, not 0
        # seeds 0 and 1 of 3, at the paper's number -0.01 and +0: their mean (marked partial in the tables)
        assert float(row["1B N=4"]) == pytest.approx(paper_table("pretrained", "held_in")[(method, "1B", 4)] - 0.005)
    t3 = _md_table(md[md.index("#### Table 3"):])
    assert t3["Task Arithmetic"]["64B N=2"] == t3["Task Arithmetic"]["8B N=8"] == "—"
    assert t3["Task Arithmetic"]["1B N=4"].endswith("*")  # seeds 0 and 1 of 3
    assert t3["Task Arithmetic"]["1B N=2"] == "0.66"
    spread = _md_table(md[md.index("#### Table 3"):].split("Standard deviation")[1])
    assert spread["Average"]["64B N=8"] == "0/3"
    assert spread["Average"]["1B N=4"].startswith("±0.01 · 2/3 · [")
    summary = {(r["base"], r["method"], r["n_experts"], r["group"]): r
               for r in csv.DictReader(out["summary_csv"].open())}
    missing, partial = summary[("pt-64b", "Average", "8", "held_in")], summary[("pt-1b", "Average", "4", "held_in")]
    assert (missing["mean"], missing["n_seeds"], missing["n_seeds_planned"], missing["ci_low"]) == ("", "0", "3", "")
    assert (partial["n_seeds"], partial["n_seeds_planned"]) == ("2", "3")
    assert float(partial["ci_low"]) < float(partial["mean"]) < float(partial["ci_high"])
    html = out["html"].read_text()
    assert html.count("data:image/png;base64,") == len(out["figures"]) > 0
    assert "<script" not in html and "src=\"http" not in html  # self-contained
    assert [p.name for p in (tmp_path / "report").glob("*.md")] == ["report.md"]


def _md_table(text: str) -> dict[str, dict[str, str]]:
    """The first Markdown table in text: {row label: {column: cell}}."""
    lines = text[text.index("\n|") + 1:].split("\n\n")[0].splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in lines[2:]]
    return {r[0]: dict(zip(head[1:], r[1:])) for r in rows}


def test_a_bad_per_example_file_fails_before_any_output(tmp_path):
    write_synthetic_run(tmp_path, paper_value(), bases=PAPER_BASES[:1], methods=PAPER_METHODS[:2],
                        num_experts=[2], seeds=[0], tasks=TASKS, n_examples=5)
    row = read_ledger(tmp_path)[0]
    (tmp_path / row["examples_path"]).unlink()
    with pytest.raises(StudyError, match="per-example results missing"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_a_study_with_no_result_yet_renders_and_replaces_an_older_report(tmp_path):
    write_synthetic_run(tmp_path, lambda cell, group: None, bases=PAPER_BASES[:2], methods=PAPER_METHODS[:2],
                        num_experts=[2, 4], seeds=[0], tasks=TASKS, n_examples=4)
    stale = tmp_path / "report" / "figures" / "fig9_from_an_older_version.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"png")
    out = write_report(tmp_path)
    md = out["markdown"].read_text()
    assert out["figures"] == [] and not stale.exists()
    assert "Cells planned: 12 (0 done, 0 failed, 0 running, 12 pending)" in md  # 2 bases x 3 rows x 2 N
    assert md.count("not drawn: no cell has a result yet") == 6
    assert "Verdict: **waiting for cells**" in md
    t1 = _md_table(md[md.index("#### Table 1"):])
    assert set(t1["Average"].values()) == set(t1[MULTITASK_LABEL].values()) == {"—"}


def test_study_yaml_gives_the_name_the_method_order_and_the_planned_groups(tmp_path):
    import yaml

    write_synthetic_run(tmp_path, lambda c, g: 0.9 if g == "held_in" else None, bases=PAPER_BASES[:1],
                        methods=["Average", "TIES"], num_experts=[2], seeds=[0], tasks=TASKS, n_examples=4,
                        multitask=False)
    config = {"name": "ordered", "work_dir": str(tmp_path), "bases": [{"name": "pt-1b", "kind": "pretrained",
              "size": "1B", "path": "models/pt"}], "experts": {"pt-1b": {"cat0": "models/e0"}},
              "methods": [{"label": "TIES", "method": "ties"}, {"label": "Average", "method": "average"},
                          {"label": "TA", "method": "task_arithmetic"}],
              "num_experts": [2], "seeds": [0], "held_out": []}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    s = load_summary(tmp_path, n_boot=0)
    assert (s.name, s.methods, s.groups) == ("ordered", ["TIES", "Average", "TA"], ["held_in"])
    (t,) = build_tables(s)
    assert t.rows == ["TIES", "Average", "TA"] and t.stat("TA", t.bases[0], 2) is None  # configured, never planned
