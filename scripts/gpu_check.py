"""GPU check of the merge actors' CUDA path: the same merge on CPU (single process) and on Ray actors that do
their math on a GPU (cluster.num_gpus > 0), compared byte for byte, plus throughput of each.

    python scripts/gpu_check.py [--hidden 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import ray
import torch

from mergescale.cluster.merge import run_distributed_merge
from mergescale.merge.driver import run_merge
from mergescale.tiny import build_tiny_llama, make_expert

METHODS = {
    "average": {}, "task_arithmetic": {"lambda": 0.5}, "ties": {"density": 0.2, "trim_scope": "global"},
    "ties_tensor": {"density": 0.2, "trim_scope": "tensor"}, "dare_linear": {"p": 0.5},
    "dare_ties": {"p": 0.5, "density": 0.5}, "breadcrumbs": {}, "model_stock": {}, "slerp": {"t": 0.3},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/gpu-check")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    args = ap.parse_args()
    root = Path(args.root)
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0)
          if torch.cuda.is_available() else "")
    base = root / "base"
    if not (root / "expert3" / "config.json").exists():
        build_tiny_llama(base, seed=0, hidden=args.hidden, heads=args.hidden // 64, layers=args.layers,
                         vocab_size=32000, max_shard_size="200MB")
        for i in range(4):
            make_expert(base, root / f"expert{i}", seed=i, max_shard_size="200MB")
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"model: {size / 1e6:.0f} MB per checkpoint, base + 4 experts")
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
    print(f"{'method':<16}{'cpu s':>8}{'gpu-actors s':>14}{'identical':>11}{'max |diff|':>12}  devices")
    for name in args.methods.split(","):
        params = METHODS[name]
        method = "ties" if name == "ties_tensor" else name
        experts = [str(root / f"expert{i}") for i in range(2 if method == "slerp" else 4)]
        cfg = {"base": str(base), "experts": experts, "method": method, "parameters": params, "tile_mb": 64,
               "cluster": {"num_cpus": 2, "num_gpus": 1 / args.workers}}
        outs = {}
        for mode in ("cpu", "gpu"):
            out = root / f"out-{name}-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.time()
            if mode == "cpu":
                run_merge(cfg, out, progress=False)
            else:
                manifest = run_distributed_merge(cfg, out, workers=args.workers, progress=False)
            outs[mode] = (out, time.time() - t0)
        same, worst = True, 0.0
        from safetensors.torch import load_file

        for f in sorted(outs["cpu"][0].glob("*.safetensors")):
            a, b = load_file(str(f)), load_file(str(outs["gpu"][0] / f.name))
            for k in a:
                same &= torch.equal(a[k], b[k])
                worst = max(worst, (a[k].float() - b[k].float()).abs().max().item())
        devices = sorted({a["device"] for a in manifest["distributed"]["actors"]})
        print(f"{name:<16}{outs['cpu'][1]:>8.1f}{outs['gpu'][1]:>14.1f}{str(same):>11}{worst:>12.3g}  {devices}")
        for mode in outs:
            shutil.rmtree(outs[mode][0], ignore_errors=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
