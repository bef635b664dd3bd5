"""`mergescale demo`: build a tiny base and four experts locally, merge them with every method, summarize."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from mergescale.merge.methods import METHODS

DEMO_PARAMETERS = {
    "average": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.2, "trim_scope": "global", "lambda": 1.0},
    "dare_linear": {"p": 0.5, "lambda": 0.5},
    "dare_ties": {"p": 0.5, "density": 0.5, "lambda": 1.0},
    "slerp": {"t": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01, "lambda": 0.5},
    "model_stock": {},
}


def run_demo(out: str | Path = "mergescale-demo", progress: bool = True) -> list[dict]:
    from mergescale.merge.driver import run_merge
    from mergescale.tiny import build_family

    out = Path(out).resolve()
    models = out / "models"
    if not (models / "expert3" / "config.json").exists():
        print(f"building a tiny Llama base and 4 experts in {models} ...")
        build_family(models, n_experts=4)
    rows = []
    for method in sorted(METHODS):
        n = 2 if method == "slerp" else 4
        config = {
            "base": str(models / "base"),
            "experts": [str(models / f"expert{i}") for i in range(n)],
            "method": method,
            "parameters": DEMO_PARAMETERS.get(method, {}),
            "out_shard_size": "300KB",
            "tile_mb": 0.05,
            "seed": 0,
        }
        cfg_path = out / "configs" / f"{method}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        t0 = time.time()
        manifest = run_merge(cfg_path, out / "merged" / method, overwrite=True, progress=progress)
        rows.append({
            "method": method,
            "experts": n,
            "shards": len(manifest["outputs"]),
            "MB": sum(s["size"] for s in manifest["outputs"].values()) / 1e6,
            "seconds": time.time() - t0,
            "sha256": next(iter(manifest["outputs"].values()))["sha256"][:12],
            "out": str(out / "merged" / method),
        })
    evaluate_merges(out, rows, progress)
    print_table(rows)
    return rows


def evaluate_merges(out: Path, rows: list[dict], progress: bool) -> None:
    """Score the base and every merge on the held-out tasks (synthetic fixture data, zero-shot rank
    classification) and add each merge's held-out score normalized by the base's, as the paper reports it."""
    from mergescale.eval import evaluate
    from mergescale.eval.aggregate import normalized_performance, scores_from_metrics
    from mergescale.eval.fixtures import write_fixture_data

    data = write_fixture_data(out / "data", "held-out", n=8)

    def scores(model: Path, name: str) -> dict[str, float]:
        result = evaluate(model, tasks="held-out", data_dir=data, out=out / "eval" / name, progress=False)
        return scores_from_metrics(result["metrics"])

    base = scores(out / "models" / "base", "base")
    for r in rows:
        perf = normalized_performance(scores(Path(r["out"]), r["method"]), base)
        r["held_out_norm"] = perf["average"]


def print_table(rows: list[dict]) -> None:
    print(f"\n{'method':<16}{'experts':>8}{'shards':>8}{'MB':>8}{'seconds':>9}  {'shard-1 sha256':<14}"
          f"{'held-out/base':>14}  output")
    for r in rows:
        print(f"{r['method']:<16}{r['experts']:>8}{r['shards']:>8}{r['MB']:>8.2f}{r['seconds']:>9.2f}  "
              f"{r['sha256']:<14}{r.get('held_out_norm', float('nan')):>14.3f}  {r['out']}")
    print("held-out/base: the merge's held-out rank-classification score over the base's (random tiny models on "
          "synthetic data, so about 1.0)")
