"""Interleaved A/B of the fused TIES kernels of two checkouts, in one process, on one real unit (best of N).

    git worktree add /tmp/old <commit>
    PYTHONPATH=. .venv/bin/python benchmarks/kernel_ab.py --old /tmp/old              # ties
    PYTHONPATH=. .venv/bin/python benchmarks/kernel_ab.py --old /tmp/old --dare-p 0.9 # dare_ties

Loads the other checkout's kernels (mergescale/merge/kernels/, or the single kernels.py of commits before issue
31) as a second copy beside this one's and calls both kernels in turn, round by round, on the same unit (an MLP
matrix of the synthetic checkpoints of benchmarks/merge_single.py, base + 4 experts, bf16), so that a noisy shared
machine's drift hits both alike. Cases:
the TIES merge with its thresholds known (`_ties_kernel`), with one-value brackets (counts only) and with
listed brackets (+-1%), for both sign rules; and the histogram pass of global TIES (`histograms`) over a sampled
window and over the whole range. Every case's outputs (merged bytes, counts, listed indices, histograms) must be
identical between the two checkouts; the script says so per case.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


class Kernels:
    """The internals the A/B calls, from a checkout's kernels in either layout: the package (primitives, merging,
    selection) or the single module of older commits."""

    def __init__(self, parts: dict):
        self.parts = parts

    def __getattr__(self, name):
        for mod in self.parts.values():
            if hasattr(mod, name):
                return getattr(mod, name)
        raise AttributeError(name)

    def slots(self, e) -> tuple:
        """The kernels' expert arguments: a padded tuple and its count (since EXPERT_SLOTS), or the tuple."""
        for name in ("slots", "_slots"):
            if hasattr(self, name):
                return getattr(self, name)(e)
        return (e,)

    def dare(self, p, name, ne):
        return (self.dare_args if "primitives" in self.parts else self._dare_args)(p, 0, name, ne, 0)

    def items(self, n):
        return (self.work_items if "primitives" in self.parts else self._work_items)(n)

    def histograms(self, params, ctx, models, windows):
        if "selection" in self.parts:
            return self.parts["selection"].histograms(0.0, ctx, models, windows)
        return self.parts["single"].histogram_arrays("ties", params, ctx, models, windows)


def load(path: Path, label: str) -> Kernels:
    """A copy of a checkout's kernels under its own module names: numba caches compiled kernels by module name and
    source path, and the copy's cache must not touch the checkout's own."""
    tmp = Path(tempfile.mkdtemp(prefix="kernels-ab-"))
    single = path / "mergescale/merge/kernels.py"
    if single.exists():
        shutil.copy(single, tmp / "kernels.py")
        return Kernels({"single": _load_file(tmp / "kernels.py", f"kernels_{label}")})
    pkg = f"kernels_{label}"
    shutil.copytree(path / "mergescale/merge/kernels", tmp / pkg)
    for f in (tmp / pkg).glob("*.py"):  # the package's own imports point at the copy
        f.write_text(f.read_text().replace("mergescale.merge.kernels", pkg))
    sys.path.insert(0, str(tmp))
    return Kernels({m: importlib.import_module(f"{pkg}.{m}") for m in ("primitives", "merging", "selection")})


def _load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # numba's cache pickles the module name
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="the other checkout (a git worktree)")
    ap.add_argument("--new", type=Path, default=C.ROOT, help="this checkout (default: the one running this script)")
    ap.add_argument("--model-mb", type=float, default=1000)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--dare-p", type=float, default=0.0)
    args = ap.parse_args(argv)

    import numpy as np

    from mergescale.checkpoint.read import Checkpoint
    from mergescale.merge.methods import get_method
    from mergescale.merge.selection import RADIX, window_around

    old, new = load(args.old.resolve(), "old"), load(args.new.resolve(), "new")
    paths = C.make_checkpoints(args.model_mb, 4)
    models = [Checkpoint(p) for p in [paths["base"]] + paths["experts"]]
    name = "model.layers.0.mlp.up_proj.weight"  # 4096 x 1536 bf16: a typical MLP unit
    rows = models[0].tensors[name].rows
    raw = tuple(m.read_bytes(name, 0, rows).view(np.uint16) for m in models)
    b, e = raw[0], raw[1:]
    n, ne = b.shape[0], len(e)

    def f32(x):
        return (x.astype(np.uint32) << 16).view(np.float32)

    k = n - int(0.2 * n)
    thr = np.array([np.partition(np.abs(f32(x) - f32(b)), k - 1)[k - 1] for x in e], np.float32)
    none = np.empty(0, np.float32)
    T = new.items(n)
    cases = {"known thresholds": (none, none, thr), "one-value brackets": (thr, thr, none),
             "brackets +-1%": ((thr * 0.99).astype(np.float32), (thr * 1.01).astype(np.float32), none)}
    params = get_method("ties").params.model_validate({"density": 0.2})
    ctx = SimpleNamespace(name=name, seed=0, element_offset=0, thresholds=None)  # what both layouts read of a unit
    windows = {"histogram, sampled window": [[window_around(float(t) * 0.99, float(t) * 1.01)] for t in thr],
               "histogram, whole range": [[RADIX] for _ in thr]}
    times: dict = {}
    outs: dict = {}
    print(f"unit {name} ({n} elements, base + {ne} experts, bf16); dare p {args.dare_p}; {C.load_average()}")
    for rnd in range(args.rounds + 1):  # round 0 compiles every kernel (or loads it from numba's cache): not timed
        for mod, label in ((old, "old"), (new, "new")):
            dare = mod.dare(args.dare_p, name, ne)
            for case, (lo, hi, th) in cases.items():
                for count_sign in (False, True):
                    below, ndefer = np.zeros((T, 2 * ne), np.int64), np.zeros(T, np.int64)
                    defer, bad = np.empty((T, n // T + 4096), np.int64), np.zeros(1, np.uint8)
                    dst = np.empty(n, np.uint16)
                    t0 = time.perf_counter()
                    mod._ties_kernel(b, *mod.slots(e), th, np.float32(1.0), count_sign, *dare, lo, hi, below, defer,
                                     ndefer, dst, bad)
                    key = (f"{case}, {'count' if count_sign else 'mass'}", label)
                    if rnd:
                        times.setdefault(key, []).append(time.perf_counter() - t0)
                    outs[key] = (dst, below, ndefer, bad, [defer[t, :min(ndefer[t], defer.shape[1])] for t in range(T)])
            if args.dare_p == 0.0:  # the histogram cases do not depend on DARE: timed once
                for case, ws in windows.items():
                    t0 = time.perf_counter()
                    got = mod.histograms(params, ctx, raw, ws)
                    if rnd:
                        times.setdefault((case, label), []).append(time.perf_counter() - t0)
                    outs[(case, label)] = [(x[0][0], np.asarray(x[0][1])) for x in got]

    def same(a, c) -> bool:
        if isinstance(a, (list, tuple)):
            return len(a) == len(c) and all(same(x, y) for x, y in zip(a, c))
        return bool(np.array_equal(a, c))

    print(C.markdown_table(["case", "old: min / median (ms)", "new: min / median (ms)", "identical"], [
        [case, f"{min(times[(case, 'old')]) * 1e3:.1f} / {np.median(times[(case, 'old')]) * 1e3:.1f}",
         f"{min(times[(case, 'new')]) * 1e3:.1f} / {np.median(times[(case, 'new')]) * 1e3:.1f}",
         "yes" if same(outs[(case, 'old')], outs[(case, 'new')]) else "NO"]
        for case in dict.fromkeys(c for c, _ in times)]))
    print(C.load_average())
    return 0


if __name__ == "__main__":
    sys.exit(main())
