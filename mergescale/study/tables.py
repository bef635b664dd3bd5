"""The paper's Tables 1-4 from a study summary: one table per (base kind, held-in / held-out), rows = the merge
methods then Multitask, columns grouped by size then N, cells = mean normalized performance over seeds (two
decimals); a companion with the standard deviation over seeds, seeds done of planned and the bootstrap 95% interval.
Rendered as Markdown, HTML and CSV. A planned cell without results is shown as missing (—), never as a number.
"""

from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass

from mergescale.study.config import MULTITASK_LABEL
from mergescale.study.summary import GROUP_LABEL, KIND_LABEL, Base, Stat, StudySummary

MISSING = "—"  # planned, no seed done yet
PARTIAL = "*"  # mean of fewer seeds than planned
LEGEND = (f"{MISSING}: planned, no result yet. {PARTIAL}: mean of fewer seeds than planned. Blank: not in the study. "
          "Held-in: merged score / the category expert's score; held-out: merged score / the base model's score; "
          "mean over a category's datasets, then over categories, then over seeds. An interval ending in ∞: some "
          "resamples of the reference model's examples scored 0, so the ratio has no upper bound (too few examples).")


@dataclass
class Table:
    number: int
    kind: str
    group: str
    bases: list[Base]
    size_labels: list[str]
    ns: list[int]
    rows: list[str]
    cells: dict[tuple[str, str, int], Stat]  # (row label, base name, N); absent: not planned

    @property
    def title(self) -> str:
        return (f"Table {self.number}: {KIND_LABEL.get(self.kind, self.kind)} bases, "
                f"{GROUP_LABEL.get(self.group, self.group)} tasks: average normalized performance")

    @property
    def slug(self) -> str:
        return f"table{self.number}_{self.kind}_{self.group}"

    @property
    def columns(self) -> list[tuple[Base, str, int]]:
        return [(b, label, n) for b, label in zip(self.bases, self.size_labels) for n in self.ns]

    def stat(self, row: str, base: Base, n: int) -> Stat | None:
        return self.cells.get((row, base.name, n))


def build_tables(summary: StudySummary) -> list[Table]:
    """One table per (kind, group) in the paper's order (instruction-tuned first, held-in before held-out)."""
    out = []
    for kind in summary.kinds:
        bases = summary.bases_of(kind)
        for group in summary.groups:
            cells = {(row, b.name, n): s for row in summary.rows for b in bases for n in summary.ns
                     if (s := summary.get(b.name, row, n, group)) is not None}
            out.append(Table(len(out) + 1, kind, group, bases, [summary.size_label(b) for b in bases], summary.ns,
                             summary.rows, cells))
    return out


def fmt(x: float | None) -> str:
    if x is None:
        return ""
    return "∞" if math.isinf(x) else f"{x:.2f}"


def mean_text(s: Stat | None) -> str:
    if s is None:
        return ""
    if s.mean is None:
        return MISSING
    return fmt(s.mean) + (PARTIAL if s.partial else "")


def spread_text(s: Stat | None) -> str:
    """'±0.02 · 3/3 · [0.81, 0.88]': sd over seeds, seeds done / planned, bootstrap 95% interval."""
    if s is None:
        return ""
    if s.mean is None:
        return f"0/{s.n_planned}"
    parts = [f"±{fmt(s.std)}" if s.std is not None else "±n/a", f"{s.n_seeds}/{s.n_planned}"]
    if s.ci is not None:
        parts.append(f"[{fmt(s.ci[0])}, {fmt(s.ci[1])}]")
    return " · ".join(parts)


def _spread_lines(s: Stat) -> list[str]:
    """The companion numbers of an HTML cell, two short lines: '±0.02 3/3' and '0.81–0.88'."""
    if s.mean is None:
        return [f"0/{s.n_planned} seeds"]
    lines = [f"±{fmt(s.std) if s.std is not None else 'n/a'} {s.n_seeds}/{s.n_planned}"]
    return lines + ([f"{fmt(s.ci[0])}–{fmt(s.ci[1])}"] if s.ci is not None else [])


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def table_markdown(t: Table) -> str:
    """The means, then the companion (sd · seeds · interval), as two Markdown tables."""
    header = ["method"] + [f"{label} N={n}" for _, label, n in t.columns]
    means = _md(header, [[row] + [mean_text(t.stat(row, b, n)) for b, _, n in t.columns] for row in t.rows])
    spread = _md(header, [[row] + [spread_text(t.stat(row, b, n)) for b, _, n in t.columns] for row in t.rows])
    return (f"#### {t.title}\n\n{means}\n\nStandard deviation over seeds · seeds done/planned · bootstrap 95% "
            f"interval over examples:\n\n{spread}\n")


def best_rows(t: Table) -> dict[tuple[str, int], set[str]]:
    """Per column, the merge method(s) with the highest mean (Multitask not competing): bold in the HTML."""
    out = {}
    for b, _, n in t.columns:
        vals = {row: s.mean for row in t.rows if row != MULTITASK_LABEL
                and (s := t.stat(row, b, n)) is not None and s.mean is not None}
        if len(vals) > 1:
            top = max(round(v, 2) for v in vals.values())
            out[(b.name, n)] = {row for row, v in vals.items() if round(v, 2) == top}
    return out


def table_html(t: Table) -> str:
    groups = "".join(f'<th colspan="{len(t.ns)}" class="grp">{html.escape(label)}</th>' for label in t.size_labels)
    ns = "".join(f'<th class="{"grp-start" if j == 0 else ""}">N={n}</th>'
                 for _ in t.size_labels for j, n in enumerate(t.ns))
    best = best_rows(t)
    body = []
    for row in t.rows:
        tds = []
        for b, _, n in t.columns:
            s = t.stat(row, b, n)
            cls = ["grp-start"] if n == t.ns[0] else []
            if s is None:
                tds.append(f'<td class="{" ".join(cls + ["none"])}"></td>')
                continue
            if s.mean is None:
                cls.append("missing")
            if row in best.get((b.name, n), ()):
                cls.append("best")
            tds.append(f'<td class="{" ".join(cls)}"><span class="m">{html.escape(mean_text(s))}</span>'
                       + "".join(f'<span class="s">{html.escape(x)}</span>' for x in _spread_lines(s)) + "</td>")
        cls = ' class="mt"' if row == MULTITASK_LABEL else ""
        body.append(f"<tr{cls}><th>{html.escape(row)}</th>{''.join(tds)}</tr>")
    # the title above the table, not a <caption>: a caption wraps to the width of a narrow table
    return (f'<p class="tcap">{html.escape(t.title)}</p><table class="res">'
            f'<thead><tr><th rowspan="2">method</th>{groups}</tr><tr>{ns}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def table_csv(t: Table) -> str:
    """The means as in the table (method x 'size N=n'), unrounded; missing and unplanned cells empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method"] + [f"{label} N={n}" for _, label, n in t.columns])
    for row in t.rows:
        stats = [t.stat(row, b, n) for b, _, n in t.columns]
        w.writerow([row] + [_num(s.mean if s is not None else None) for s in stats])
    return buf.getvalue()


def summary_csv(summary: StudySummary) -> str:
    """Every planned cell of every table, one line each: mean, sd, seeds and interval (empty where missing)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "group", "base", "size", "method", "n_experts", "mean", "std", "n_seeds", "n_seeds_planned",
                "ci_low", "ci_high"])
    for t in build_tables(summary):
        for row in t.rows:
            for b, _, n in t.columns:
                s = t.stat(row, b, n)
                if s is not None:
                    lo, hi = s.ci if s.ci is not None else (None, None)
                    w.writerow([t.kind, t.group, b.name, b.size, row, n, _num(s.mean), _num(s.std), s.n_seeds,
                                s.n_planned, _num(lo), _num(hi)])
    return buf.getvalue()


def _num(x) -> str:
    return "" if x is None else repr(round(float(x), 10))
