"""The paper's five findings, tested on a study summary. Each finding is one or more parts; a part compares table
cells (means over seeds) and lists every comparison it made, so a verdict can be traced to its cells. A comparison
needs both of its cells done: missing cells are left out and counted, never read as 0.

Verdicts: a part holds when every comparison agrees, mostly holds when more than half do, does not hold otherwise,
cannot be tested when the grid has nothing to compare (the reason is given), and is waiting for cells when its
comparisons all lack a result yet. Size comparisons of a study still running use the smallest and largest sizes done
so far and say how many do. A finding's verdict is that of its testable parts when they agree, else "partly holds".
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from mergescale.study.config import MULTITASK_LABEL
from mergescale.study.summary import KIND_LABEL, Base, Stat, StudySummary

HOLDS, MOSTLY, FAILS, PARTLY = "holds", "mostly holds", "does not hold", "partly holds"
UNTESTABLE, WAITING = "cannot be tested", "waiting for cells"
SAME_TOLERANCE = 0.05  # finding 5: methods "about the same" when their means differ by at most this
IT, PT = "instruction_tuned", "pretrained"


@dataclass
class Check:
    cell: str  # which cells, e.g. "8B, N=4, TIES"
    holds: bool
    detail: str  # the numbers compared
    separated: bool | None = None  # the two compared cells' 95% intervals do not overlap (None: no intervals)


@dataclass
class Part:
    claim: str
    checks: list[Check] = field(default_factory=list)
    untestable: str | None = None  # why the grid cannot test it
    n_missing: int = 0  # comparisons left out because a cell has no result yet
    n_interim: int = 0  # comparisons of the smallest and largest sizes done so far, not those planned

    @property
    def verdict(self) -> str:
        k, n = sum(c.holds for c in self.checks), len(self.checks)
        if n == 0:
            return UNTESTABLE if self.untestable or not self.n_missing else WAITING
        return HOLDS if k == n else MOSTLY if 2 * k > n else FAILS


@dataclass
class Finding:
    number: int
    claim: str
    parts: list[Part]

    @property
    def verdict(self) -> str:
        vs = [p.verdict for p in self.parts if p.verdict not in (UNTESTABLE, WAITING)]
        if not vs:
            return WAITING if any(p.verdict == WAITING for p in self.parts) else UNTESTABLE
        return vs[0] if all(v == vs[0] for v in vs) else PARTLY


def _f(x: float) -> str:
    return f"{x:.2f}"


def _separated(a: Stat, b: Stat) -> bool | None:
    if a.ci is None or b.ci is None:
        return None
    return a.ci[1] < b.ci[0] or b.ci[1] < a.ci[0]


def _done(s: Stat | None) -> bool:
    return s is not None and s.mean is not None


def _pairs_by_size(summary: StudySummary) -> list[tuple[Base, Base]]:
    """(instruction-tuned, pretrained) bases of the same size, where each kind has exactly one base of it."""
    out = []
    for it in summary.bases_of(IT):
        pts = [b for b in summary.bases_of(PT) if b.size_params == it.size_params]
        if len(pts) == 1 and sum(b.size_params == it.size_params for b in summary.bases_of(IT)) == 1:
            out.append((it, pts[0]))
    return out


def _both_kinds(summary: StudySummary, part: Part) -> list[tuple[Base, Base]]:
    if not (summary.bases_of(IT) and summary.bases_of(PT)):
        part.untestable = ("needs both base kinds; the study has only "
                           f"{', '.join(KIND_LABEL.get(k, k) for k in summary.kinds) or 'none'}")
        return []
    pairs = _pairs_by_size(summary)
    if not pairs:
        part.untestable = "no model size has one base of each kind"
    return pairs


def _need(part: Part, ok: bool, why: str) -> bool:
    if not ok and part.untestable is None:
        part.untestable = why
    return ok


def finding_1(s: StudySummary) -> Finding:
    a = Part("instruction-tuned above pretrained on held-in, at the same size, N and method")
    b = Part("the gap (instruction-tuned minus pretrained, held-in) is wider at the largest N than at the smallest, "
             "per size and method")
    for it, pt in _both_kinds(s, a):
        for m in s.methods:
            for n in s.ns:
                x, y = s.get(it.name, m, n, "held_in"), s.get(pt.name, m, n, "held_in")
                if not (_done(x) and _done(y)):
                    a.n_missing += 1
                    continue
                a.checks.append(Check(f"{it.size}, N={n}, {m}", x.mean > y.mean,
                                      f"instruction-tuned {_f(x.mean)} vs pretrained {_f(y.mean)}", _separated(x, y)))
            if _need(b, len(s.ns) >= 2, f"needs two numbers of experts; the study has N = {s.ns}"):
                lo, hi = s.ns[0], s.ns[-1]
                ends = [(s.mean(it.name, m, n, "held_in"), s.mean(pt.name, m, n, "held_in")) for n in (lo, hi)]
                if any(x is None or y is None for x, y in ends):
                    b.n_missing += 1
                    continue
                g0, g1 = (x - y for x, y in ends)
                b.checks.append(Check(f"{it.size}, {m}", g1 > g0, f"gap {_f(g0)} at N={lo}, {_f(g1)} at N={hi}"))
    if a.untestable:
        b.untestable = a.untestable
    return Finding(1, "Experts from the instruction-tuned base merge better (held-in), and the gap grows with N.",
                   [a, b])


def finding_2(s: StudySummary) -> Finding:
    a = Part("held-in at the largest size above held-in at the smallest, per base kind, N and method")
    for kind in s.kinds:
        bases = s.bases_of(kind)
        if len({b.size_params for b in bases}) < 2:
            continue
        for m in s.methods:
            for n in s.ns:
                done = [b for b in bases if _done(s.get(b.name, m, n, "held_in"))]
                if len({b.size_params for b in done}) < 2:
                    a.n_missing += 1
                    continue
                small, big = done[0], done[-1]  # the extremes done so far
                a.n_interim += (small, big) != (bases[0], bases[-1])
                x, y = s.get(big.name, m, n, "held_in"), s.get(small.name, m, n, "held_in")
                a.checks.append(Check(f"{KIND_LABEL[kind]}, N={n}, {m}", x.mean > y.mean,
                                      f"{big.size} {_f(x.mean)} vs {small.size} {_f(y.mean)}", _separated(x, y)))
    _need(a, a.checks or a.n_missing, "needs two model sizes of one base kind")
    return Finding(2, "Bigger models merge better.", [a])


def finding_3(s: StudySummary) -> Finding:
    a = Part("merged held-out above 1.0 (better than the base model), per base kind, size, N and method")
    b = Part("instruction-tuned held-out never falls as N grows, per size and method")
    c = Part("at the largest instruction-tuned size and the largest N, the best merge method beats Multitask on "
             "held-out")
    if "held_out" not in s.groups:
        for p in (a, b, c):
            p.untestable = "the study has no held-out tasks"
        return Finding(3, _F3, [a, b, c])
    for base in s.bases:
        for m in s.methods:
            for n in s.ns:
                x = s.get(base.name, m, n, "held_out")
                if not _done(x):
                    a.n_missing += 1
                    continue
                a.checks.append(Check(f"{KIND_LABEL[base.kind]} {base.size}, N={n}, {m}", x.mean > 1.0,
                                      f"{_f(x.mean)}" + (f" [{_f(x.ci[0])}, {_f(x.ci[1])}]" if x.ci else "")))
    its = s.bases_of(IT)
    if _need(b, bool(its), "needs an instruction-tuned base") and _need(b, len(s.ns) >= 2,
                                                                        f"needs two numbers of experts; N = {s.ns}"):
        for base in its:
            for m in s.methods:
                ys = [s.mean(base.name, m, n, "held_out") for n in s.ns]
                if any(y is None for y in ys):
                    b.n_missing += 1
                    continue
                b.checks.append(Check(f"{base.size}, {m}", all(y2 >= y1 for y1, y2 in zip(ys, ys[1:])),
                                      ", ".join(f"N={n}: {_f(y)}" for n, y in zip(s.ns, ys))))
    if _need(c, bool(its), "needs an instruction-tuned base") and _need(c, s.has_multitask,
                                                                        "the study has no multitask model"):
        big, n = its[-1], s.ns[-1]
        mt = s.get(big.name, MULTITASK_LABEL, n, "held_out")
        merged = {m: x for m in s.methods if _done(x := s.get(big.name, m, n, "held_out"))}
        if not _done(mt) or not merged:
            c.n_missing += 1
        else:
            best = max(merged, key=lambda m: merged[m].mean)
            c.checks.append(Check(f"{big.size}, N={n}", merged[best].mean > mt.mean,
                                  f"{best} {_f(merged[best].mean)} vs Multitask {_f(mt.mean)}",
                                  _separated(merged[best], mt)))
    return Finding(3, _F3, [a, b, c])


_F3 = ("Merging improves held-out generalization; with strong bases, more experts help monotonically; merging many "
       "large instruction-tuned experts can beat the multitask model on held-out.")


def finding_4(s: StudySummary) -> Finding:
    a = Part("at the largest N, the held-in loss against the experts (1 - score) is smaller at the largest size than "
             "at the smallest, per base kind and method")
    if _need(a, len(s.ns) >= 2, f"needs two numbers of experts; the study has N = {s.ns}"):
        lo, hi = s.ns[0], s.ns[-1]
        for kind in s.kinds:
            bases = s.bases_of(kind)
            if len({b.size_params for b in bases}) < 2:
                continue
            for m in s.methods:
                v = {(b.name, n): s.mean(b.name, m, n, "held_in") for b in bases for n in (lo, hi)}
                done = [b for b in bases if v[(b.name, lo)] is not None and v[(b.name, hi)] is not None]
                if len({b.size_params for b in done}) < 2:
                    a.n_missing += 1
                    continue
                small, big = done[0], done[-1]  # the extremes done so far
                a.n_interim += (small, big) != (bases[0], bases[-1])
                detail = "; ".join(f"{b.size} {_f(v[(b.name, hi)])} at N={hi} (from {_f(v[(b.name, lo)])} at N={lo})"
                                   for b in (big, small))
                a.checks.append(Check(f"{KIND_LABEL[kind]}, {m}", 1 - v[(big.name, hi)] < 1 - v[(small.name, hi)],
                                      detail))
        _need(a, a.checks or a.n_missing, "needs two model sizes of one base kind")
    return Finding(4, "Bigger models can merge more experts with little held-in loss.", [a])


def finding_5(s: StudySummary) -> Finding:
    a = Part(f"at the largest instruction-tuned size, the merge methods' means lie within {SAME_TOLERANCE} of each "
             "other, at every N, held-in and held-out")
    its = s.bases_of(IT)
    if _need(a, bool(its), "needs an instruction-tuned base") and _need(
            a, len(s.methods) >= 2, f"needs two merge methods; the study has {', '.join(s.methods)}"):
        big = its[-1]
        for g in [g for g in ("held_in", "held_out") if g in s.groups]:
            for n in s.ns:
                v = {m: s.mean(big.name, m, n, g) for m in s.methods}
                if any(x is None for x in v.values()):
                    a.n_missing += 1
                    continue
                lo, hi = min(v, key=v.get), max(v, key=v.get)
                a.checks.append(Check(f"{big.size}, N={n}, {g.replace('_', '-')}",
                                      v[hi] - v[lo] <= SAME_TOLERANCE + 1e-12,
                                      f"spread {_f(v[hi] - v[lo])}: {lo} {_f(v[lo])} to {hi} {_f(v[hi])}"))
    return Finding(5, "At the largest size, instruction-tuned, all merge methods perform about the same.", [a])


def evaluate_findings(summary: StudySummary) -> list[Finding]:
    return [f(summary) for f in (finding_1, finding_2, finding_3, finding_4, finding_5)]


def _part_line(p: Part) -> str:
    if p.verdict == UNTESTABLE:
        return f"{p.claim}: cannot be tested: {p.untestable or 'nothing to compare'}."
    if p.verdict == WAITING:
        return f"{p.claim}: no comparison has its cells done yet ({p.n_missing} waiting)."
    k, n = sum(c.holds for c in p.checks), len(p.checks)
    text = f"{p.claim}: {k} of {n}"
    sep = [c.separated for c in p.checks if c.holds and c.separated is not None]
    if sep:
        text += f" ({sum(sep)} of those {len(sep)} with non-overlapping 95% intervals)"
    misses = [c for c in p.checks if not c.holds]
    if misses:
        shown = "; ".join(f"{c.cell} ({c.detail})" for c in misses[:4])
        more = f"; and {len(misses) - 4} more" if len(misses) > 4 else ""
        text += f"; exception{'s' if len(misses) > 1 else ''}: {shown}{more}"
    if p.n_interim:
        text += f"; {p.n_interim} of them compare the smallest and largest sizes done so far, not those planned"
    if p.n_missing:
        text += f"; {p.n_missing} comparison{'s' if p.n_missing > 1 else ''} waiting for missing cells"
    return text + "."


def findings_markdown(findings: list[Finding]) -> str:
    out = []
    for f in findings:
        out.append(f"**{f.number}. {f.claim}** Verdict: **{f.verdict}**.\n")
        out += [f"- {_part_line(p)}" for p in f.parts]
        rows = [(p, c) for p in f.parts for c in p.checks]
        if rows:
            out.append("\n<details><summary>the cells behind it</summary>\n")
            out.append("| part | cells | holds | numbers |\n|---:|---|---|---|")
            out += [f"| {f.parts.index(p) + 1} | {c.cell} | {'yes' if c.holds else 'no'} | {c.detail} |"
                    for p, c in rows]
            out.append("\n</details>\n")
        out.append("")
    return "\n".join(out)


def findings_html(findings: list[Finding]) -> str:
    out = []
    for f in findings:
        cls = {HOLDS: "ok", FAILS: "bad", UNTESTABLE: "na", WAITING: "na"}.get(f.verdict, "mid")
        parts = "".join(f"<li>{html.escape(_part_line(p))}</li>" for p in f.parts)
        rows = "".join(f"<tr><td>{f.parts.index(p) + 1}</td><td>{html.escape(c.cell)}</td>"
                       f"<td class=\"{'ok' if c.holds else 'bad'}\">{'yes' if c.holds else 'no'}</td>"
                       f"<td>{html.escape(c.detail)}</td></tr>" for p in f.parts for c in p.checks)
        details = (f"<details><summary>the cells behind it</summary><table class=\"cells\"><tr><th>part</th>"
                   f"<th>cells</th><th>holds</th><th>numbers</th></tr>{rows}</table></details>" if rows else "")
        out.append(f'<div class="finding"><p><b>{f.number}. {html.escape(f.claim)}</b> '
                   f'<span class="verdict {cls}">{f.verdict}</span></p><ul>{parts}</ul>{details}</div>')
    return "\n".join(out)
