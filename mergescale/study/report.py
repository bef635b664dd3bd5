"""A study's report: RUN_DIR/report/report.md and a self-contained report.html (figures embedded), with the
paper's Tables 1-4 (also as CSV), its figures, and its five findings tested on the ledger.

    report/
      report.md, report.html
      figures/<name>.png         the figures report.md shows (report.html embeds the same PNGs)
      tables/table<k>_<kind>_<group>.csv   each table's means (method x size N=n), unrounded
      tables/summary.csv         every planned table cell: mean, sd over seeds, seeds done/planned, 95% interval

Safe while the study runs: cells with no result are shown as missing. Everything is computed (and every input
checked) before the first file is written; each file is written to a temporary name and renamed, and files of an
earlier report in figures/ and tables/ that this one does not write are removed.
"""

from __future__ import annotations

import base64
import html
import os
import time
import uuid
from pathlib import Path

from mergescale.study.bootstrap import BOOT_SEED, LEVEL, N_BOOT
from mergescale.study.figures import render_figures
from mergescale.study.findings import evaluate_findings, findings_html, findings_markdown
from mergescale.study.summary import StudySummary, load_summary
from mergescale.study.tables import LEGEND, build_tables, summary_csv, table_csv, table_html, table_markdown


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, n_boot: int = N_BOOT,
                 boot_seed: int = BOOT_SEED) -> dict:
    """Write the report of a run directory (module docstring); returns {"markdown", "html", "summary_csv": Path,
    "tables", "figures": [Path]}. n_boot: bootstrap replicates (0: no intervals)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    summary = load_summary(run_dir, n_boot, boot_seed)
    tables = build_tables(summary)
    findings = evaluate_findings(summary)
    figures, skipped = render_figures(summary)

    files: dict[str, bytes] = {}
    for t in tables:
        files[f"tables/{t.slug}.csv"] = table_csv(t).encode()
    files["tables/summary.csv"] = summary_csv(summary).encode()
    for name, _, png in figures:
        files[f"figures/{name}.png"] = png
    files["report.md"] = _markdown(summary, tables, findings, figures, skipped, boot_seed).encode()
    files["report.html"] = _html(summary, tables, findings, figures, skipped, boot_seed).encode()

    for rel, data in files.items():
        _write_atomic(out / rel, data)
    for sub, ext in (("figures", ".png"), ("tables", ".csv")):
        for p in (out / sub).glob(f"*{ext}"):
            if f"{sub}/{p.name}" not in files:
                p.unlink()
    return {"markdown": out / "report.md", "html": out / "report.html", "summary_csv": out / "tables/summary.csv",
            "tables": [out / f"tables/{t.slug}.csv" for t in tables],
            "figures": [out / f"figures/{name}.png" for name, _, _ in figures]}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _progress(s: StudySummary) -> str:
    if not s.status:
        return (f"Ledger: {s.n_rows} rows. No cells.parquet: the planned cells are those of the ledger, so cells not "
                "started yet cannot be shown as missing.")
    total = sum(s.status.values())
    parts = ", ".join(f"{s.status.get(k, 0)} {k}" for k in ("done", "failed", "running", "pending"))
    other = {k: v for k, v in s.status.items() if k not in ("done", "failed", "running", "pending")}
    parts += "".join(f", {v} {k}" for k, v in sorted(other.items()))
    return f"Ledger: {s.n_rows} rows. Cells planned: {total} ({parts})."


def _notes(s: StudySummary, boot_seed: int) -> list[str]:
    notes = [
        "Normalized performance: held-in, the merged model's score on a dataset / the score of the expert of that "
        "dataset's category; held-out, the merged score / the base model's score (1.0 = as good as the reference). "
        "Mean over the datasets of a category, then over categories, then over seeds (each seed merges its own "
        "categories, shared by every base, size and method). The Multitask row is the multitask model scored on the "
        "same tasks as the merges of its column.",
        "± is the sample standard deviation over seeds (n/a with one seed); k/m is seeds done of seeds planned.",
    ]
    if s.n_boot:
        notes.append(
            f"Intervals: {LEVEL:.0%} percentile bootstrap over evaluation examples, {s.n_boot} replicates, seed "
            f"{boot_seed}. Each replicate draws every task's examples with replacement, once for all models scored on "
            "it, rescores the merged model and its reference on the same draw, and normalizes and aggregates them "
            "as above. It measures the noise of the evaluation sets, not that of the seeds (the ±).")
    else:
        notes.append("No bootstrap intervals (no per-example results read).")
    return notes


def _markdown(s, tables, findings, figures, skipped, boot_seed) -> str:
    out = [f"# Study report: {s.name}", "", _progress(s), ""]
    if s.failed:
        out += ["Failed cells, by error:", ""] + [f"- {line}" for line in _failures(s)] + [""]
    out += ["## Findings", "", findings_markdown(findings), "## Tables", "", LEGEND, ""]
    for t in tables:
        out += [table_markdown(t), f"CSV: `tables/{t.slug}.csv`", ""]
    out += ["Every cell with its interval: `tables/summary.csv`.", "", "## Figures", ""]
    for name, title, _ in figures:
        out += [f"![{title}](figures/{name}.png)", "", f"*{title}*", ""]
    out += [f"- {title}: not drawn: {why}." for _, title, why in skipped]
    out += ["", "## How the numbers are made", ""] + [f"- {n}" for n in _notes(s, boot_seed)]
    out += ["", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.", ""]
    return "\n".join(out)


def _failures(s: StudySummary, shown: int = 4) -> list[str]:
    """One line per distinct error (its first line): the error, how many cells, the first few of them."""
    by_error: dict[str, list[str]] = {}
    for cell, err in s.failed:
        by_error.setdefault(_first_line(err), []).append(cell)
    return [f"{err} ({len(cells)} cell{'s' if len(cells) > 1 else ''}: {', '.join(cells[:shown])}"
            + (f" and {len(cells) - shown} more; cells.parquet lists them)" if len(cells) > shown else ")")
            for err, cells in by_error.items()]


def _first_line(text: str) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else "(no message)"
    return line if len(line) <= 200 else line[:197] + "..."


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1400px;
padding:0 16px;color:#1a1a1a;line-height:1.45}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:3px}
.legend,.note{color:#444;font-size:.92em}
table.res{border-collapse:collapse;margin:10px 0 4px;font-size:.9em}
.tcap{font-weight:600;margin:18px 0 4px}
table.res th,table.res td{padding:3px 5px;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
table.res thead th{background:#f4f4f4;text-align:center}table.res tbody th{text-align:left}
table.res .grp-start{border-left:2px solid #bbb}table.res th.grp{border-left:2px solid #bbb}
table.res td .m{display:block;font-size:1.08em}table.res td .s{display:block;color:#555;font-size:.78em}
table.res td.best .m{font-weight:700}table.res td.missing .m{color:#b00}
table.res tr.mt th,table.res tr.mt td{background:#fafafa;border-top:2px solid #ccc}
.scroll{overflow-x:auto}
figure{margin:18px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#333;font-style:italic;margin-top:4px}
.finding{margin:10px 0 14px}.finding ul{margin:4px 0}
.verdict{padding:1px 8px;border-radius:9px;font-size:.88em;margin-left:6px;white-space:nowrap}
.verdict.ok{background:#dff3e2;color:#185c26}.verdict.bad{background:#fbe0e0;color:#8a1c1c}
.verdict.mid{background:#fff1cf;color:#6b4c00}.verdict.na{background:#eee;color:#555}
table.cells{border-collapse:collapse;font-size:.85em;margin:6px 0}
table.cells td,table.cells th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
td.ok{color:#185c26}td.bad{color:#8a1c1c;font-weight:600}
"""


def _html(s, tables, findings, figures, skipped, boot_seed) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Study report: {e(s.name)}</title>"
           f"<style>{CSS}</style></head><body>", f"<h1>Study report: {e(s.name)}</h1>",
           f"<p class=\"note\">{e(_progress(s))}</p>"]
    if s.failed:
        out.append("<p>Failed cells, by error:</p><ul>" + "".join(f"<li>{e(x)}</li>" for x in _failures(s)) + "</ul>")
    out += ["<h2>Findings</h2>", findings_html(findings), "<h2>Tables</h2>", f"<p class=\"legend\">{e(LEGEND)} "
            "Bold: the best merge method of a column. Under each mean: ± standard deviation over seeds and seeds "
            "done/planned, then the bootstrap 95% interval.</p>"]
    for t in tables:
        out.append(f"<div class=\"scroll\">{table_html(t)}</div><p class=\"note\">CSV: tables/{e(t.slug)}.csv</p>")
    out.append("<h2>Figures</h2>")
    for _, title, png in figures:
        data = base64.b64encode(png).decode()
        out.append(f"<figure><img alt=\"{e(title)}\" src=\"data:image/png;base64,{data}\">"
                   f"<figcaption>{e(title)}</figcaption></figure>")
    if skipped:
        out.append("<ul>" + "".join(f"<li>{e(title)}: not drawn: {e(why)}.</li>" for _, title, why in skipped)
                   + "</ul>")
    out += ["<h2>How the numbers are made</h2><ul>"] + [f"<li>{e(n)}</li>" for n in _notes(s, boot_seed)]
    out += [f"</ul><p class=\"note\">Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>",
            "</body></html>"]
    return "\n".join(out)
