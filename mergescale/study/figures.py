"""The paper's figures from a study summary (matplotlib, Agg). One fixed color per merge method (by the study's
method order), black for Multitask, one marker per base kind, the reference level 1.0 drawn dashed and labelled.
Missing cells are gaps in a line or absent bars, never zeros. A figure the grid cannot support raises CannotPlot
with the reason (the report prints it in the figure's place).
"""

from __future__ import annotations

import functools
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mergescale.study.config import MULTITASK_LABEL  # noqa: E402
from mergescale.study.summary import GROUP_LABEL, KIND_LABEL, Base, StudySummary  # noqa: E402

# tab10 without its gray (grays are the base kinds' and the reference's)
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
MULTITASK_COLOR = "#000000"
KIND_MARKER = {"instruction_tuned": "s", "pretrained": "o"}
KIND_COLOR = {"instruction_tuned": "#111111", "pretrained": "#8a8a8a"}  # where series are kinds (the radar)
KIND_LINESTYLE = {"instruction_tuned": "-", "pretrained": ":"}  # where both kinds share a panel
REF_STYLE = dict(color="#666666", linestyle="--", linewidth=1.2, zorder=1)
REF_LABEL = {"held_in": "experts' level (1.0)", "held_out": "base model (1.0)"}
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 10, "figure.dpi": 100,
         "axes.grid": True, "grid.alpha": 0.3}


class CannotPlot(ValueError):
    """The grid cannot support this figure; the message says why."""


def method_colors(summary: StudySummary) -> dict[str, str]:
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(summary.methods)}
    colors[MULTITASK_LABEL] = MULTITASK_COLOR
    return colors


def _marker(kind: str) -> str:
    return KIND_MARKER.get(kind, "^")


def _y(summary: StudySummary, base: str, method: str, ns: list[int], group: str) -> np.ndarray:
    return np.array([np.nan if (m := summary.mean(base, method, n, group)) is None else m for n in ns])


def _need_ns(summary: StudySummary) -> None:
    if len(summary.ns) < 2:
        raise CannotPlot(f"needs at least two numbers of experts; the study has N = {summary.ns}")


def _finish(fig: Figure, handles: dict | None = None) -> Figure:
    """One legend for the figure below the panels: `handles` (label -> artist), or each labelled artist once; as
    many columns as fit the figure's width."""
    if handles is None:
        handles = {}
        for ax in fig.axes:
            for h, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, h)
    # data series first, the reference lines last
    labels = sorted(handles, key=lambda label: label in REF_LABEL.values())
    width = fig.get_figwidth() * 100  # pixels at the report's dpi; ~7 px a character at font size 10
    if sum(len(label) * 7 + 50 for label in labels) <= width:
        ncol = len(labels)  # one row
    else:
        ncol = max(1, min(len(labels), int(width // (max(len(label) for label in labels) * 7 + 50))))
    fig.legend([handles[label] for label in labels], labels, loc="outside lower center", ncol=ncol, frameon=False)
    return fig


def _line(ax, x, y, **kw):
    """A data series (gid "series": what the tests count); missing points are NaN, drawn as gaps."""
    return ax.plot(x, y, gid="series", **kw)[0]


def _reference(ax, group: str) -> None:
    ax.axhline(1.0, label=REF_LABEL[group], gid="reference", **REF_STYLE)


def styled(fn):
    """Draw under the report's font sizes (text takes its size when it is created)."""

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        with plt.rc_context(STYLE):
            return fn(*args, **kw)

    return wrapper


def _figure(nrows: int, ncols: int, width: float, height: float, **kw) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), layout="constrained",
                             squeeze=False, **kw)
    return fig, axes


@styled
def fig_radar(summary: StudySummary) -> Figure:
    """Fig. 1: held-in performance, one radar per N (the smallest and the largest); spokes = size x method,
    clockwise from the top; one polygon per base kind."""
    ns = sorted({summary.ns[0], summary.ns[-1]}) if summary.ns else []
    spokes = [(p, size, m) for p, size in _sizes(summary) for m in summary.methods]
    if len(spokes) < 3:
        raise CannotPlot(f"a radar needs at least three spokes (sizes x methods); the study has {len(spokes)}")
    if not ns:
        raise CannotPlot("the study has no cells")
    # one subfigure per N, so that constrained layout makes room for each title above the spoke labels
    fig = plt.figure(figsize=(5.8 * len(ns), 6.0), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(1, len(ns)))
    for sub, n in zip(subfigs, ns):
        sub.suptitle(f"held-in, N={n}", fontsize=STYLE["axes.titlesize"])
    axes = np.array([[sub.add_subplot(projection="polar") for sub in subfigs]])
    angles = np.linspace(0, 2 * np.pi, len(spokes), endpoint=False)
    circle = np.linspace(0, 2 * np.pi, 361)
    values = []
    for ax, n in zip(axes[0], ns):
        ax.set_theta_zero_location("N")
        ax.set_theta_direction(-1)
        ax.plot(circle, np.ones_like(circle), label=REF_LABEL["held_in"], gid="reference", **REF_STYLE)
        for kind in summary.kinds:
            by_size = {b.size_params: b for b in summary.bases_of(kind)}
            y = np.array([np.nan if (b := by_size.get(p)) is None or (v := summary.mean(b.name, m, n, "held_in"))
                          is None else v for p, _, m in spokes])
            values.append(y)
            color = KIND_COLOR.get(kind, "#444444")
            _line(ax, np.append(angles, angles[0]), np.append(y, y[0]), color=color, marker=_marker(kind),
                  linewidth=1.6, label=KIND_LABEL.get(kind, kind))
            if np.isfinite(y).all():  # a polygon with a missing spoke would be drawn to 0 there
                ax.fill(angles, y, color=color, alpha=0.06)
        ax.set_xticks(angles, [f"{m}\n{size}" for _, size, m in spokes])
        ax.tick_params(axis="x", pad=6)
        ax.set_rlabel_position(180 / len(spokes))  # radial labels between the first two spokes
    finite = np.concatenate(values)
    finite = finite[np.isfinite(finite)]
    lo = max(0.0, np.floor(10 * finite.min()) / 10 - 0.1) if finite.size else 0.0
    hi = max(1.05, finite.max() * 1.03) if finite.size else 1.05
    # radial labels below 1.0 only: the 1.0 circle is labelled in the legend, and a label there meets the spokes'
    ticks = [t for t in np.arange(np.ceil(lo * 5) / 5, 1.0 - 1e-9, 0.2)]
    for ax in axes[0]:
        ax.set_ylim(lo, hi)  # the radius starts at `lo` (its tick label says so)
        ax.set_yticks(ticks, [f"{t:.1f}" for t in ticks], color="#555555", fontsize=9)
    return _finish(fig)


@styled
def fig_vs_n(summary: StudySummary, group: str) -> Figure:
    """Figs. 2, 4 and 5: `group` performance vs N; one row per base kind, one panel per size; one line per method
    and the Multitask line."""
    _need_ns(summary)
    if group not in summary.groups:
        raise CannotPlot(f"the study has no {GROUP_LABEL[group]} tasks")
    colors = method_colors(summary)
    kinds = summary.kinds
    ncols = max(len(summary.bases_of(k)) for k in kinds)
    fig, axes = _figure(len(kinds), ncols, 3.3, 2.9, sharey="row")  # kinds can lie far apart (Multitask)
    for i, kind in enumerate(kinds):
        bases = summary.bases_of(kind)
        for j in range(len(bases), ncols):
            fig.delaxes(axes[i, j])
        for j, b in enumerate(bases):
            ax = axes[i, j]
            _reference(ax, group)
            for row in summary.rows:
                _line(ax, summary.ns, _y(summary, b.name, row, summary.ns, group), color=colors[row],
                      marker=_marker(kind), linestyle="-." if row == MULTITASK_LABEL else "-", linewidth=1.6,
                      label=row)
            ax.set_title(f"{summary.size_label(b)}, {KIND_LABEL.get(kind, kind)}")
            ax.set_xticks(summary.ns)
            ax.set_xlabel("number of experts merged (N)")
            if j == 0:
                ax.set_ylabel(f"normalized {GROUP_LABEL[group]}")
    return _finish(fig)


def _sizes(summary: StudySummary) -> list[tuple[float, str]]:
    return sorted({(b.size_params, b.size) for b in summary.bases})


def _kind_handles(summary: StudySummary, colors: dict[str, str], group: str) -> dict:
    """Legend proxies where lines are method x kind: a color per method, a marker and line style per kind."""
    from matplotlib.lines import Line2D

    handles = {REF_LABEL[group]: Line2D([], [], **{k: v for k, v in REF_STYLE.items() if k != "zorder"})}
    handles |= {m: Line2D([], [], color=colors[m], linewidth=3) for m in summary.methods}
    handles |= {KIND_LABEL.get(k, k): Line2D([], [], color="#333333", marker=_marker(k),
                                             linestyle=KIND_LINESTYLE.get(k, "-")) for k in summary.kinds}
    return handles


@styled
def fig_held_in_vs_size(summary: StudySummary) -> Figure:
    """Fig. 3: held-in performance vs model size, one panel per N; a line per (method, base kind): color = method,
    marker and line style = kind; the experts' level dashed."""
    sizes = _sizes(summary)
    if len(sizes) < 2:
        raise CannotPlot(f"needs at least two model sizes; the study has {', '.join(s for _, s in sizes) or 'none'}")
    if not summary.ns:
        raise CannotPlot("the study has no cells")
    colors = method_colors(summary)
    fig, axes = _figure(1, len(summary.ns), 3.4, 3.2, sharey=True)
    x = np.arange(len(sizes))
    for ax, n in zip(axes[0], summary.ns):
        _reference(ax, "held_in")
        for kind in summary.kinds:
            by_size = {b.size_params: b for b in summary.bases_of(kind)}
            for m in summary.methods:
                y = [np.nan if (b := by_size.get(p)) is None or (v := summary.mean(b.name, m, n, "held_in")) is None
                     else v for p, _ in sizes]
                _line(ax, x, y, color=colors[m], marker=_marker(kind), linestyle=KIND_LINESTYLE.get(kind, "-"),
                      linewidth=1.5, label=f"{m}, {KIND_LABEL.get(kind, kind)}")
        ax.set_xticks(x, [s for _, s in sizes])
        ax.set_xlabel("model size")
        ax.set_title(f"N={n}")
    axes[0, 0].set_ylabel("normalized held-in")
    return _finish(fig, _kind_handles(summary, colors, "held_in"))


@styled
def fig_in_and_out_vs_n(summary: StudySummary) -> Figure:
    """Fig. 6: held-in and held-out side by side vs N; one row per base kind, one line per size: the mean over the
    merge methods, drawn only where every method has a result."""
    _need_ns(summary)
    groups = [g for g in ("held_in", "held_out") if g in summary.groups]
    if len(groups) < 2:
        raise CannotPlot("needs both held-in and held-out tasks")
    shades = plt.get_cmap("viridis")
    sizes = [p for p, _ in _sizes(summary)]
    fig, axes = _figure(len(summary.kinds), 2, 4.6, 3.0)
    for i, kind in enumerate(summary.kinds):
        for ax, g in zip(axes[i], groups):
            _reference(ax, g)
            for b in summary.bases_of(kind):
                ys = np.array([_y(summary, b.name, m, summary.ns, g) for m in summary.methods])
                shade = shades(0.85 * sizes.index(b.size_params) / max(1, len(sizes) - 1))
                _line(ax, summary.ns, ys.mean(axis=0), color=shade, marker=_marker(kind), linewidth=1.8,
                      label=summary.size_label(b))
            ax.set_title(f"{GROUP_LABEL[g]}, {KIND_LABEL.get(kind, kind)}: mean over methods")
            ax.set_xticks(summary.ns)
            ax.set_xlabel("number of experts merged (N)")
            ax.set_ylabel(f"normalized {GROUP_LABEL[g]}")
    return _finish(fig)


@styled
def fig_methods_at_largest(summary: StudySummary) -> Figure:
    """Fig. 7: the methods side by side at each kind's largest size: per N, one point per method and Multitask
    with its bootstrap 95% interval; one row per kind, held-in and held-out side by side."""
    if len(summary.methods) < 2:
        raise CannotPlot(f"needs at least two merge methods; the study has {', '.join(summary.methods) or 'none'}")
    if not summary.ns:
        raise CannotPlot("the study has no cells")
    colors = method_colors(summary)
    rows = summary.rows
    groups = [g for g in ("held_in", "held_out") if g in summary.groups]
    fig, axes = _figure(len(summary.kinds), len(groups), max(4.6, 0.2 * len(rows) * len(summary.ns) + 1.5), 3.0)
    step = 0.7 / len(rows)
    for i, kind in enumerate(summary.kinds):
        largest: Base = summary.bases_of(kind)[-1]
        for ax, g in zip(axes[i], groups):
            _reference(ax, g)
            for k, row in enumerate(rows):
                xs, ys, err = [], [], []
                for j, n in enumerate(summary.ns):
                    s = summary.get(largest.name, row, n, g)
                    if s is None or s.mean is None:
                        continue
                    xs.append(j - 0.35 + step * (k + 0.5))
                    ys.append(s.mean)
                    lo, hi = s.ci if s.ci is not None else (s.mean, s.mean)
                    err.append((s.mean - lo, hi - s.mean if math.isfinite(hi) else 0.0))
                ax.errorbar(xs, ys, yerr=np.array(err).T if err else None, fmt=_marker(kind), color=colors[row],
                            markersize=6, elinewidth=1.2, capsize=2.5, label=row, gid="series",
                            markerfacecolor="white" if row == MULTITASK_LABEL else colors[row])
            for j in range(1, len(summary.ns)):
                ax.axvline(j - 0.5, color="#dddddd", linewidth=0.8, zorder=0)
            ax.set_xticks(range(len(summary.ns)), [f"N={n}" for n in summary.ns])
            ax.set_xlim(-0.5, len(summary.ns) - 0.5)
            ax.grid(axis="x", visible=False)
            ax.set_title(f"{summary.size_label(largest)} {KIND_LABEL.get(kind, kind)}, {GROUP_LABEL[g]}")
            ax.set_ylabel(f"normalized {GROUP_LABEL[g]}")
    return _finish(fig)


FIGURES = [
    ("fig1_radar_held_in", "Fig. 1: held-in performance by method and size (radar), smallest and largest N",
     fig_radar),
    ("fig2_held_out_vs_n", "Figs. 2 and 5: held-out performance vs number of experts, per size, with Multitask",
     lambda s: fig_vs_n(s, "held_out")),
    ("fig3_held_in_vs_size", "Fig. 3: held-in performance vs model size per N, pretrained vs instruction-tuned",
     fig_held_in_vs_size),
    ("fig4_held_in_vs_n", "Fig. 4: held-in performance vs number of experts, per size",
     lambda s: fig_vs_n(s, "held_in")),
    ("fig6_in_and_out_vs_n", "Fig. 6: held-in and held-out vs number of experts, side by side",
     fig_in_and_out_vs_n),
    ("fig7_methods_at_largest", "Fig. 7: the merge methods side by side at the largest size, with bootstrap 95% "
     "intervals",
     fig_methods_at_largest),
]


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    with plt.rc_context(STYLE):
        # legends below the axes stay whole
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return buf.getvalue()


def render_figures(summary: StudySummary) -> tuple[list[tuple[str, str, bytes]], list[tuple[str, str, str]]]:
    """([(name, title, PNG bytes)], [(name, title, why it was skipped)])."""
    made, skipped = [], []
    if not any(st.mean is not None for st in summary.stats.values()):
        return [], [(name, title, "no cell has a result yet") for name, title, _ in FIGURES]
    for name, title, fn in FIGURES:
        try:
            made.append((name, title, png_bytes(fn(summary))))
        except CannotPlot as e:
            skipped.append((name, title, str(e)))
    return made, skipped
