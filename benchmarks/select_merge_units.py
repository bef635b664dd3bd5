"""Per-tensor TIES one-pass select+merge kernel on real units of the benchmark checkpoints (best of N).

    PYTHONPATH=. .venv/bin/python benchmarks/select_merge_units.py            # ~1 GB per model checkpoints
    PYTHONPATH=. .venv/bin/python benchmarks/select_merge_units.py --model-mb 256

Times `kernels.select_and_merge` (density 0.2, 4 experts) on one attention and one MLP matrix read whole from
the synthetic checkpoints of benchmarks/merge_single.py, prints the share of elements the bracketed merge
listed for a redo, and times the merge alone with the thresholds known and the sampled brackets alone. Run it at
two commits to compare kernel versions on the same data.
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

    import numpy as np

    from mergescale.checkpoint.read import Checkpoint
    from mergescale.merge import kernels
    from mergescale.merge.kernels import primitives, ties
    from mergescale.merge.kernels import selection as kernel_selection
    from mergescale.merge.methods import UnitContext, get_method

    paths = C.make_checkpoints(args.model_mb, 4)
    C.warm_kernels(4)
    models = [Checkpoint(p) for p in [paths["base"]] + paths["experts"]]
    method = get_method("ties")
    params = method.params.model_validate({"trim_scope": "tensor", "density": 0.2})
    listed = {}
    gather = ties._ties_gather_kernel

    def counting(*a):  # count the listed elements: idx is the first int64 array after the base
        listed["n"] = next(x for x in a[1:] if getattr(x, "dtype", None) == "int64").shape[0]
        return gather(*a)

    ties._ties_gather_kernel = counting
    for name in (f"model.layers.{args.layer}.self_attn.q_proj.weight", f"model.layers.{args.layer}.mlp.up_proj.weight"):
        info = models[0].tensors[name]
        raw = tuple(m.read_bytes(name, 0, info.rows).view(kernels.RAW_CODES[info.dtype]) for m in models)
        n = raw[0].shape[0]
        out = np.empty_like(raw[0])
        ctx = UnitContext(name=name, shape=info.shape, element_offset=0, seed=0, thresholds=[{} for _ in raw[1:]])
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            thr = kernels.select_and_merge(method, params, ctx, raw, out, [n - n // 5] * 4)
            best = min(best, time.perf_counter() - t0)
        share = f"{listed['n'] / n:.1%}" if "n" in listed else "-"
        # the merge alone, its thresholds known (what a selection pass first would leave to do)
        known = UnitContext(name=name, shape=info.shape, element_offset=0, seed=0,
                            thresholds=[{"min": v} for v in (thr or [0.0] * 4)])
        merge_only = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            kernels.merge(method, params, [1.0] * 4, known, raw, True, out)
            merge_only = min(merge_only, time.perf_counter() - t0)
        # the sampled brackets alone (the sample's magnitudes and their two order statistics per expert)
        dare_args = primitives.dare_args(0.0, 0, name, len(raw) - 1, 0)
        brackets = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            kernel_selection.sample_bracket(raw[0], raw[1:], dare_args, [n - n // 5] * 4)
            brackets = min(brackets, time.perf_counter() - t0)
        print(f"{name}: {n} elements, best {best * 1e3:.1f} ms, listed for redo {share}, one pass: {thr is not None}; "
              f"merge with known thresholds {merge_only * 1e3:.1f} ms; sampled brackets alone {brackets * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
