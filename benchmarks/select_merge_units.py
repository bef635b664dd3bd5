"""Per-tensor TIES one-pass select+merge kernel on real units of the benchmark checkpoints (best of N).

    PYTHONPATH=. .venv/bin/python benchmarks/select_merge_units.py            # ~1 GB per model checkpoints
    PYTHONPATH=. .venv/bin/python benchmarks/select_merge_units.py --model-mb 256

Times `kernels.select_and_merge_ties` (density 0.2, 4 experts) on one attention and one MLP matrix read whole from
the synthetic checkpoints of benchmarks/merge_single.py, prints the share of elements the bracketed merge
listed for a redo, and times the merge alone with the thresholds known and the sampled brackets alone. Run it at two commits to compare kernel
versions on the same data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-mb", type=float, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--layer", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from mergescale.merge import kernels
    from mergescale.checkpoint.read import Checkpoint
    from mergescale.merge.methods import UnitContext, get_method

    paths = C.make_checkpoints(args.model_mb, 4)
    C.warm_kernels(4)
    models = [Checkpoint(p) for p in [paths["base"]] + paths["experts"]]
    params = get_method("ties").params.model_validate({"trim_scope": "tensor", "density": 0.2})
    listed = {}
    gather = getattr(kernels, "_ties_gather_kernel", None)
    if gather is not None:  # count the listed elements (kernels of this commit)
        def counting(*args):
            # idx: the first int64 array after the base (the arguments before it changed with EXPERT_SLOTS)
            listed["n"] = next(a for a in args[1:] if getattr(a, "dtype", None) == "int64").shape[0]
            return gather(*args)
        kernels._ties_gather_kernel = counting
    for name in (f"model.layers.{args.layer}.self_attn.q_proj.weight", f"model.layers.{args.layer}.mlp.up_proj.weight"):
        base, *experts = [m.read(name) for m in models]
        n = base.numel()
        out = torch.empty_like(base)
        ctx = UnitContext(name=name, shape=tuple(base.shape), element_offset=0, seed=0, thresholds=[{} for _ in experts])
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            thr = kernels.select_and_merge_ties("ties", params, [1.0] * 4, ctx, base, experts, out, [n - n // 5] * 4)
            best = min(best, time.perf_counter() - t0)
        share = f"{listed['n'] / n:.1%}" if "n" in listed else "-"
        # the merge alone, its thresholds known (what a selection pass first would leave to do)
        known = UnitContext(name=name, shape=tuple(base.shape), element_offset=0, seed=0,
                            thresholds=[{"min": v} for v in (thr or [0.0] * 4)])
        merge_only = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            kernels.merge_tile("ties", params, [1.0] * 4, known, base, experts, out)
            merge_only = min(merge_only, time.perf_counter() - t0)
        # the sampled brackets alone (the sample's magnitudes and their two order statistics per expert)
        raw = kernels._raw([base] + list(experts))
        dare_args = kernels._dare_args(0.0, 0, name, len(experts), 0)
        brackets = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            kernels._sample_bracket(raw[0], raw[1:], dare_args, [n - n // 5] * 4)
            brackets = min(brackets, time.perf_counter() - t0)
        print(f"{name}: {n} elements, best {best * 1e3:.1f} ms, listed for redo {share}, one pass: {thr is not None}; "
              f"merge with known thresholds {merge_only * 1e3:.1f} ms; sampled brackets alone {brackets * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
