"""The paper's five findings on crafted ledgers where each holds and where each fails, and the report's figures:
their panels and series, and the grids they cannot be drawn from."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergescale.study import figures as G
from mergescale.study import findings as F
from mergescale.study.config import MULTITASK_LABEL
from mergescale.study.summary import build_summary
from mergescale.study.synthetic import PAPER_METHODS, PAPER_NS, PAPER_SIZES, paper_table

KINDS = ("instruction_tuned", "pretrained")


def ledger(value, sizes=("1B", "8B"), kinds=KINDS, methods=("Average", "TIES"), ns=(2, 4), seeds=(0,),
           multitask=True):
    """Ledger rows with one dataset per group: value(kind, size, method, n, group) -> normalized (None: not done).
    Each (kind, size) is one base."""
    rows = []
    for kind in kinds:
        for size in sizes:
            for method in list(methods) + ([MULTITASK_LABEL] if multitask else []):
                for n in ns:
                    for seed in seeds:
                        for group in ("held_in", "held_out"):
                            v = value(kind, size, method, n, group)
                            if v is not None:
                                rows.append({"study": "crafted", "base": f"{kind[:2]}-{size}", "kind": kind,
                                             "size": size, "method": method, "n_experts": n, "seed": seed,
                                             "task": f"{group}_t", "category": f"{group}_c", "group": group,
                                             "normalized": v})
    return rows


def summary_of(value, sizes=("1B", "8B"), kinds=KINDS, methods=("Average", "TIES"), ns=(2, 4), seeds=(0,),
               multitask=True):
    """The summary of ledger(...), every cell of the grid planned (cells.parquet rows)."""
    rows = ledger(value, sizes, kinds, methods, ns, seeds, multitask)
    cells = [{"base": f"{k[:2]}-{z}", "kind": k, "size": z, "method": m, "n_experts": n, "seed": seed,
              "status": "done" if value(k, z, m, n, "held_in") is not None else "pending", "error": None}
             for k in kinds for z in sizes for m in methods for n in ns for seed in seeds]
    return build_summary(rows, cells)


SIZE_RANK = {"1B": 0, "8B": 1, "24B": 2, "64B": 3}


def paper_like(kind, size, method, n, group):
    """Every finding holds: IT above PT with a gap growing with N; bigger is better and loses less; held-out above
    1, rising with N; the largest IT merges beat Multitask held-out at the largest N; methods within 0.02 at the
    largest IT size."""
    r, it = SIZE_RANK[size], kind == "instruction_tuned"
    spread = 0.02 if method == "TIES" else 0.0
    if group == "held_in":
        if method == MULTITASK_LABEL:
            return 0.97
        return (0.9 if it else 0.7) + 0.05 * r - (0.01 if it else 0.05) * (n - 2) * (1 - 0.4 * r) + spread
    if method == MULTITASK_LABEL:
        return 1.05
    return 1.01 + 0.01 * n + 0.01 * r + spread * 0.1


def test_every_finding_holds_on_a_ledger_built_to_show_it():
    found = F.evaluate_findings(summary_of(paper_like))
    assert [f.verdict for f in found] == [F.HOLDS] * 5, F.findings_markdown(found)
    f1 = found[0].parts[0]
    assert len(f1.checks) == 2 * 2 * 2  # sizes x methods x N
    assert f1.checks[0].cell == "1B, N=2, Average"
    assert f1.checks[0].detail == "instruction-tuned 0.90 vs pretrained 0.70"


def test_each_finding_fails_where_the_ledger_contradicts_it():
    def flip(kind, size, method, n, group):
        v = paper_like(kind, size, method, n, group)
        if group == "held_in" and method == "TIES" and size == "8B" and n == 4 and kind == "pretrained":
            return 0.99  # finding 1: one exception
        return v

    f1 = F.finding_1(summary_of(flip))
    assert f1.parts[0].verdict == F.MOSTLY and [c.cell for c in f1.parts[0].checks if not c.holds] == ["8B, N=4, TIES"]
    assert "exception: 8B, N=4, TIES (instruction-tuned 0.96 vs pretrained 0.99)" in F._part_line(f1.parts[0])
    # ... and one in the gap: 8B TIES pretrained now rises from N=2 to N=4
    assert [c.cell for c in f1.parts[1].checks if not c.holds] == ["8B, TIES"] and f1.verdict == F.MOSTLY

    def swapped_kinds(kind, size, method, n, group):
        return paper_like(KINDS[1 - KINDS.index(kind)], size, method, n, group)

    f1 = F.finding_1(summary_of(swapped_kinds))
    assert f1.verdict == F.FAILS and not any(c.holds for p in f1.parts for c in p.checks)

    def smaller_is_better(kind, size, method, n, group):
        return paper_like(kind, "8B" if size == "1B" else "1B", method, n, group)

    found = F.evaluate_findings(summary_of(smaller_is_better))
    assert found[1].verdict == F.FAILS and sum(c.holds for c in found[1].parts[0].checks) == 0
    assert found[3].verdict == F.FAILS

    def held_out_falls(kind, size, method, n, group):  # above 1 but falling with N, below Multitask's 1.05 at N=4
        v = paper_like(kind, size, method, n, group)
        return 1.06 - 0.005 * n if group == "held_out" and method != MULTITASK_LABEL else v

    f3 = F.finding_3(summary_of(held_out_falls))
    assert [p.verdict for p in f3.parts] == [F.HOLDS, F.FAILS, F.FAILS] and f3.verdict == F.PARTLY
    assert f3.parts[2].checks[0].detail == "Average 1.04 vs Multitask 1.05"

    def methods_differ(kind, size, method, n, group):
        v = paper_like(kind, size, method, n, group)
        return v + 0.06 if method == "TIES" and size == "8B" and n == 4 and group == "held_in" else v

    far_apart = F.finding_5(summary_of(lambda *a: paper_like(*a) + (0.2 if a[2] == "TIES" else 0.0)))
    assert far_apart.verdict == F.FAILS and len(far_apart.parts[0].checks) == 4
    f5 = F.finding_5(summary_of(methods_differ))
    assert f5.verdict == F.MOSTLY  # 3 of 4 (N x group) at 8B
    assert [c.cell for c in f5.parts[0].checks if not c.holds] == ["8B, N=4, held-in"]


def test_findings_say_what_the_grid_cannot_test():
    one_kind = F.evaluate_findings(summary_of(paper_like, kinds=("pretrained",)))
    assert one_kind[0].verdict == F.UNTESTABLE
    assert "needs both base kinds; the study has only pretrained" in F._part_line(one_kind[0].parts[0])
    assert one_kind[4].verdict == F.UNTESTABLE  # "at the largest instruction-tuned size"
    one_size = F.evaluate_findings(summary_of(paper_like, sizes=("8B",)))
    assert one_size[1].verdict == one_size[3].verdict == F.UNTESTABLE
    assert "needs two model sizes" in F._part_line(one_size[1].parts[0])
    no_mt = F.finding_3(summary_of(paper_like, multitask=False))
    assert no_mt.parts[2].verdict == F.UNTESTABLE and no_mt.parts[2].untestable == "the study has no multitask model"
    one_n = F.finding_1(summary_of(paper_like, ns=(4,)))
    assert one_n.parts[1].verdict == F.UNTESTABLE and one_n.verdict == F.HOLDS


def test_missing_cells_are_left_out_of_the_comparisons_not_read_as_zero():
    def partial(kind, size, method, n, group):
        return None if size == "8B" and kind == "pretrained" and n == 4 else paper_like(kind, size, method, n, group)

    f1 = F.finding_1(summary_of(partial))
    assert len(f1.parts[0].checks) == 6 and f1.parts[0].n_missing == 2 and f1.parts[0].verdict == F.HOLDS
    assert "2 comparisons waiting for missing cells" in F._part_line(f1.parts[0])


def _paper_summary():
    rows = []
    for kind in KINDS:
        for group in ("held_in", "held_out"):
            for (method, size, n), v in paper_table(kind, group).items():
                rows.append({"study": "paper", "base": f"{kind[:2]}-{size}", "kind": kind, "size": size,
                             "method": method, "n_experts": n, "seed": 0, "task": "t", "category": "c",
                             "group": group, "normalized": v})
    return build_summary(rows, [])


def test_findings_on_the_papers_own_numbers_count_what_its_tables_show():
    it, pt = paper_table("instruction_tuned", "held_in"), paper_table("pretrained", "held_in")
    found = F.evaluate_findings(_paper_summary())
    wins = sum(it[(m, s, n)] > pt[(m, s, n)] for m in PAPER_METHODS for s in PAPER_SIZES for n in PAPER_NS)
    assert (sum(c.holds for c in found[0].parts[0].checks), len(found[0].parts[0].checks)) == (wins, 64)
    out = paper_table("instruction_tuned", "held_out")
    monotone = sum(all(out[(m, s, b)] >= out[(m, s, a)] for a, b in zip(PAPER_NS, PAPER_NS[1:]))
                   for m in PAPER_METHODS for s in PAPER_SIZES)
    assert sum(c.holds for c in found[2].parts[1].checks) == monotone == 12  # 8B falls in all four methods
    best = max(out[(m, "64B", 8)] for m in PAPER_METHODS)
    assert found[2].parts[2].checks[0].holds == (best > out[(MULTITASK_LABEL, "64B", 8)])  # 1.10 vs 1.05
    for m in PAPER_METHODS:  # finding 5 at 64B: within 0.05 on both groups
        assert max(it[(x, "64B", 2)] for x in PAPER_METHODS) - it[(m, "64B", 2)] <= 0.05
    assert found[4].verdict == F.HOLDS


# -- figures --------------------------------------------------------------------------------------------------


def _series(ax):
    return [x for x in ax.get_lines() if x.get_gid() == "series"]


def test_every_figure_has_its_panels_and_series():
    s = summary_of(paper_like, sizes=("1B", "8B", "24B"), ns=(2, 4, 8))
    n_kinds, n_sizes, n_ns, n_methods, n_rows = 2, 3, 3, 2, 3  # rows: the methods and Multitask
    fig = G.fig_radar(s)
    assert len(fig.axes) == 2  # the smallest and the largest N
    for ax in fig.axes:
        assert len(_series(ax)) == n_kinds
        assert len(ax.get_xticks()) == n_sizes * n_methods
        assert [x.get_gid() for x in ax.get_lines()].count("reference") == 1
    for group in ("held_in", "held_out"):
        fig = G.fig_vs_n(s, group)
        assert len(fig.axes) == n_kinds * n_sizes
        for ax in fig.axes:
            assert [x.get_label() for x in _series(ax)] == ["Average", "TIES", MULTITASK_LABEL]
            assert ax.get_xlabel() == "number of experts merged (N)"
            ref = [x for x in ax.get_lines() if x.get_gid() == "reference"]
            assert len(ref) == 1 and list(ref[0].get_ydata()) == [1.0, 1.0]
        assert fig.legends and G.REF_LABEL[group] in [t.get_text() for t in fig.legends[0].get_texts()]
    fig = G.fig_held_in_vs_size(s)
    assert len(fig.axes) == n_ns and all(len(_series(ax)) == n_methods * n_kinds for ax in fig.axes)
    fig = G.fig_in_and_out_vs_n(s)
    assert len(fig.axes) == n_kinds * 2 and all(len(_series(ax)) == n_sizes for ax in fig.axes)
    fig = G.fig_methods_at_largest(s)
    assert len(fig.axes) == n_kinds * 2 and all(len(ax.containers) == n_rows for ax in fig.axes)
    assert all(ax.get_title().startswith("24B") for ax in fig.axes)


def test_a_missing_cell_is_a_gap_not_a_zero():
    def partial(kind, size, method, n, group):
        return None if (size, method, n) == ("8B", "TIES", 4) else paper_like(kind, size, method, n, group)

    fig = G.fig_vs_n(summary_of(partial, ns=(2, 4, 8)), "held_in")
    ax = fig.axes[1]  # 8B instruction-tuned
    ties = next(x for x in _series(ax) if x.get_label() == "TIES")
    y = np.asarray(ties.get_ydata(), float)
    assert math.isnan(y[1]) and np.isfinite(y[[0, 2]]).all()


def test_figures_the_grid_cannot_support_are_skipped_with_the_reason():
    one_size = summary_of(paper_like, sizes=("8B",))
    with pytest.raises(G.CannotPlot, match="needs at least two model sizes; the study has 8B"):
        G.fig_held_in_vs_size(one_size)
    one_n = summary_of(paper_like, ns=(4,))
    with pytest.raises(G.CannotPlot, match=r"two numbers of experts; the study has N = \[4\]"):
        G.fig_vs_n(one_n, "held_out")
    made, skipped = G.render_figures(summary_of(paper_like, sizes=("8B",), methods=("TIES",), ns=(4,)))
    assert [name for name, _, _ in made] == []
    assert {name for name, _, _ in skipped} == {name for name, _, _ in G.FIGURES}
    assert all(why for _, _, why in skipped)


def test_a_running_study_compares_the_sizes_done_so_far_and_waits_for_the_rest():
    def no_largest(kind, size, method, n, group):
        return None if size == "24B" else paper_like(kind, size, method, n, group)

    found = F.evaluate_findings(summary_of(no_largest, sizes=("1B", "8B", "24B")))
    f2 = found[1].parts[0]
    assert f2.verdict == F.HOLDS and f2.n_interim == len(f2.checks) == 2 * 2 * 2 and f2.n_missing == 0
    assert f2.checks[0].detail.startswith("8B ") and " vs 1B " in f2.checks[0].detail
    assert "8 of them compare the smallest and largest sizes done so far" in F._part_line(f2)
    assert found[4].verdict == F.WAITING  # "at the largest size": 24B, not done
    assert F._part_line(found[4].parts[0]).endswith("no comparison has its cells done yet (4 waiting).")  # N x group
