"""Single-process merge benchmark: each method vs the I/O floor on the same synthetic checkpoints.

    .venv/bin/python benchmarks/merge_single.py                       # ~1 GB per model, base + 4 experts
    .venv/bin/python benchmarks/merge_single.py --model-mb 64         # quick smoke test
    .venv/bin/python benchmarks/merge_single.py --write-doc           # also update docs/BENCHMARKS.md
    .venv/bin/python benchmarks/merge_single.py --out-dir /dev/shm    # outputs on tmpfs: no disk in merge or floor
    .venv/bin/python benchmarks/merge_single.py --cache cold          # inputs evicted before every run: read from disk
    .venv/bin/python benchmarks/merge_single.py --checkouts OLD . --methods task_arithmetic   # A/B of two checkouts

Checkpoints (Llama-like names and shapes, bf16, sharded safetensors + index + config.json) are generated once
into .bench/ckpt-<size>mb-v<N>/ and reused. Each method runs `mergescale.merge(config, out)` in a fresh
subprocess; the I/O floor (read every input tensor once, write one output of the same size, fsync it) runs in a
subprocess too. `--checkouts` instead times the merges only, alternating the mergescale of each checkout (a git
worktree of another commit) round by round, so that the machine's drift hits both alike. Page cache is warmed
first, so every run reads the same (cached) files; `--cache cold` instead evicts the inputs from the page cache
before every run (floor and merge alike), as for models larger than RAM, where every byte comes from the disk.
Peak RSS is the kernel's high-water mark of the child (VmHWM; the child is one process). It is not polled from
outside, because polling takes CPU from the run being timed (see _common.run_measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = {
    "average": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties (tensor)": ("ties", {"trim_scope": "tensor"}),
    "ties (global)": ("ties", {"trim_scope": "global"}),
    "dare_linear": ("dare_linear", {}),
    "dare_ties": ("dare_ties", {}),
}
TARGETS = {"ties (tensor)": 1.5, "dare_ties": 1.5, "ties (global)": 2.5}
RSS_TARGET = 10**9


# ------------------------------------------------------------------------------------------------------------
# Children (run in a fresh interpreter)


def _rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def child_merge(spec: dict) -> dict:
    import torch  # noqa: F401 - imported before the baseline RSS is taken

    import mergescale  # the public API: the same call in every checkout --checkouts compares
    from mergescale.merge import kernels

    # Like the imports, loading the compiled kernels from numba's cache (~0.5 s) is paid once per process, not per
    # merge: timed apart, so the merge time is the method's, whatever the process did before.
    t0 = time.perf_counter()
    kernels.warm_up(len(spec["experts"]))
    load_s = time.perf_counter() - t0
    base_rss = _rss_now()
    profile = spec.pop("profile", None)
    out = spec.pop("out")
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        manifest = mergescale.merge(spec, out, overwrite=True, progress=False)
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    else:
        manifest = mergescale.merge(spec, out, overwrite=True, progress=False)
    dt = time.perf_counter() - t0
    return {"time_s": dt, "cpu_s": _cpu_s() - cpu0, "kernel_load_s": load_s, "timing": manifest["timing"],
            "base_rss": base_rss, "maxrss": _peak_rss()}


def _cpu_s() -> float:
    """CPU seconds this process has used so far, user + system, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss() -> int:
    """This process's own high-water RSS (VmHWM of its address space). Not ru_maxrss: Linux folds the forking
    parent's high-water mark into the child's at exec, so a driver that had generated the checkpoints (~1.4 GB)
    made every child report at least that."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_floor(spec: dict) -> dict:
    """Read every input tensor's bytes once (mapped, or preadv into a reused buffer), write out_bytes to a new file
    (with O_DIRECT through mergescale's DirectStream, or buffered: as the merge writes), fsync."""
    import torch  # noqa: F401 - same interpreter baseline as the merge children

    from mergescale.checkpoint.read import Checkpoint

    base_rss = _rss_now()
    chunk = int(spec.get("chunk_mb", 16) * 2**20)
    buf = bytearray(chunk)
    view = memoryview(buf)
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    read = 0
    for path in spec["models"]:
        ck = Checkpoint(path)
        for info in ck.tensors.values():
            if spec.get("read") == "mmap":  # the merge's own mapped read: map and fault in every page, no copy
                ck.map_rows(info.name, 0, info.rows)
                read += info.nbytes
                continue
            fd = ck._fd(info.file)
            pos, end = info.offset, info.offset + info.nbytes
            while pos < end:
                n = os.preadv(fd, [view[: min(chunk, end - pos)]], pos)
                pos += n
                read += n
        ck.close()
    t_read = time.perf_counter() - t0
    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    stream = None
    if spec.get("write") == "direct":
        from mergescale.checkpoint.direct_io import open_stream

        stream = open_stream(out, fd)
    written, total = 0, spec["out_bytes"]
    while written < total:
        piece = view[: min(chunk, total - written)]
        if stream is not None:
            stream.write(written, piece)
            written += len(piece)
        else:
            written += os.pwrite(fd, piece, written)
    if stream is not None:
        stream.close()
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    cpu_s = _cpu_s() - cpu0
    out.unlink()
    return {"time_s": dt, "cpu_s": cpu_s, "read_s": t_read, "read_bytes": read, "write_bytes": written,
            "base_rss": base_rss, "maxrss": _peak_rss()}


# ------------------------------------------------------------------------------------------------------------
# Parent


def run_child(kind: str, spec: dict, timeout: float = 3600, root: Path = C.ROOT) -> dict:
    """Run this script's `kind` child with mergescale imported from `root` (this checkout by default)."""
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, json.dumps(spec)]
    # Not polled: the child is one process, so its own ru_maxrss is its exact peak, and a poller would take CPU
    # from the run being timed (see run_measured).
    r = C.run_measured(cmd, env=env, timeout=timeout, poll=False)
    if r["rc"] != 0 or r["result"] is None:
        raise RuntimeError(f"{kind} child failed (rc {r['rc']}):\n{r['stderr'][-4000:]}")
    res = r["result"]
    res["wall_s"] = r["wall_s"]
    if spec.get("profile"):
        print(r["stderr"], file=sys.stderr)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-mb", type=float, default=1000,
                    help="size of each model in MB of bf16 weights (default 1000)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                    help="subset of: " + ", ".join(METHODS))
    ap.add_argument("--tile-mb", type=float, default=None,
                    help="override the config's tile_mb (default: mergescale's default)")
    ap.add_argument("--read", choices=["mmap", "pread"], default=None,
                    help="override the config's read (default: mergescale's default); "
                         "the I/O floor reads the same way")
    ap.add_argument("--write", choices=["direct", "buffered"], default=None,
                    help="override the config's write (default: mergescale's default); "
                         "the I/O floor writes the same way")
    ap.add_argument("--checkouts", nargs="+", type=Path, metavar="DIR",
                    help="A/B: time each method's merge with mergescale from each of these checkouts in turn "
                         "(no floor)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --checkouts")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (the fastest is reported)")
    ap.add_argument("--profile", action="store_true", help="run each method under cProfile and print the top functions")
    ap.add_argument("--write-doc", action="store_true",
                    help="replace the 'Single-process merge' section of docs/BENCHMARKS.md")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where merges and the floor write (default .bench/out-single); e.g. a tmpfs such as /dev/shm "
                         "takes the disk out of both, leaving the merge's compute against the floor's reads and copy")
    ap.add_argument("--cache", choices=["warm", "cold"], default="warm",
                    help="warm (default): inputs read from the page cache in every run; cold: evicted before every run "
                         "(floor and merge), so they come from the disk, as in a merge of models larger than RAM")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_doc and (args.out_dir is not None or args.cache != "warm"):
        ap.error("--write-doc records the default setting (warm inputs, output on the disk under .bench/); "
                 "drop --out-dir and --cache")

    if args._child:
        kind, spec = args._child[0], json.loads(args._child[1])
        res = child_merge(spec) if kind == "merge" else child_floor(spec)
        print(json.dumps(res), flush=True)
        return 0

    from mergescale.config import MergeConfig

    paths = C.make_checkpoints(args.model_mb, args.experts)
    C.warm_kernels(args.experts)
    models = [paths["base"]] + paths["experts"]
    in_bytes = sum(C.model_bytes(p) for p in models)
    out_bytes = C.model_bytes(paths["base"])
    tile_mb = args.tile_mb  # None: mergescale's default (config.AUTO_TILES_MB shared by the models)
    read = args.read or MergeConfig.model_fields["read"].default
    write = args.write or MergeConfig.model_fields["write"].default
    cfg = paths["config"]
    print(f"models: base + {args.experts} experts, {C.fmt_bytes(out_bytes)} each ({cfg['num_hidden_layers']} layers, "
          f"hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}); tile_mb {tile_label(tile_mb, len(models))}; "
          f"read {read}; write {write}")
    if args.cache == "warm":
        print(f"warming page cache: {C.warm_page_cache(models):.1f} s; load average {C.load_average()}")
    else:
        print(f"inputs evicted from the page cache before every run; load average {C.load_average()}")

    def prepare() -> None:
        if args.cache == "cold":
            left = C.drop_page_cache(models)
            if left > 0.01:
                print(f"warning: {left:.1%} of the inputs still cached after eviction", flush=True)
    out_dir = (args.out_dir / "mergescale-out-single") if args.out_dir is not None else C.BENCH / "out-single"
    shutil.rmtree(out_dir, ignore_errors=True)
    if args.checkouts:
        return compare_checkouts(args, paths, tile_mb, out_dir, prepare)

    # The floor's write + fsync depends on a shared disk whose speed drifts by 2x within minutes here, so every
    # merge run is paired with a floor run just before it and compared with that one (a fixed floor measured
    # once made the ratios swing with the disk, not with the code).
    floor_spec = {"models": [str(p) for p in models], "out": str(out_dir / "floor.bin"), "out_bytes": out_bytes,
                  "read": read, "write": write}
    load_start = C.load_average()
    floors, rows, raw = [], [], {"floors": [], "methods": {}}
    cores = os.cpu_count() or 1
    for label in args.methods:
        method, params = METHODS[label]
        spec = {"base": str(paths["base"]), "experts": [str(p) for p in paths["experts"]], "method": method,
                "parameters": params, "tile_mb": tile_mb, "read": read, "write": write,
                "out": str(out_dir / "merged"),
                "profile": args.profile}
        pairs = []
        for _ in range(args.repeat):
            prepare()
            floors.append(run_child("floor", dict(floor_spec)))
            try:
                prepare()
                pairs.append((floors[-1], run_child("merge", dict(spec))))
            finally:
                shutil.rmtree(out_dir / "merged", ignore_errors=True)
                shutil.rmtree(out_dir / ".merged.partial", ignore_errors=True)
        floor, r = min(pairs, key=lambda p: p[1]["time_s"] / p[0]["time_s"])
        raw["methods"][label] = {**r, "floor": floor}
        ratio = r["time_s"] / floor["time_s"]
        target = TARGETS.get(label)
        ok = (f"{'yes' if ratio <= target else 'NO'} (<= {target}x)") if target else "-"
        peak = max(m["maxrss"] for _, m in pairs)  # the target holds for every run, not just the fastest
        rows.append([label, f"{r['time_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['cpu_s'] / cores:.2f}",
                     f"{r['timing']['statistics_s']:.2f}", f"{floor['time_s']:.2f}",
                     f"{ratio:.2f}x", ok, f"{in_bytes / r['time_s'] / 1e9:.2f}", C.fmt_bytes(peak),
                     C.fmt_bytes(r["base_rss"]), "yes" if peak < RSS_TARGET else "NO"])
        print(f"{label:16s} {r['time_s']:7.2f} s  {ratio:5.2f}x floor ({floor['time_s']:.2f} s)  "
              f"peak RSS {C.fmt_bytes(peak)}", flush=True)
    raw["floors"] = floors
    load_end = C.load_average()
    headers = ["method", "time (s)", "CPU (s)", f"CPU / {cores} cores (s)", "of which stats (s)",
               "I/O floor run before it (s)", "vs that floor", "time target", "input GB/s", "peak RSS (max of runs)",
               "RSS after imports", "RSS < 1 GB"]
    times = sorted(f["time_s"] for f in floors)
    cpus = sorted(f["cpu_s"] for f in floors)
    floor = floors[0]
    rows.insert(0, ["I/O floor (all runs)", f"{times[0]:.2f}-{times[-1]:.2f}", f"{cpus[0]:.2f}-{cpus[-1]:.2f}", "-",
                    "-", "-", "1.00x", "-",
                    f"{in_bytes / times[len(times) // 2] / 1e9:.2f} (median)",
                    C.fmt_bytes(max(f["maxrss"] for f in floors)), C.fmt_bytes(floor["base_rss"]), "-"])
    table = C.markdown_table(headers, rows)
    print()
    print(table)
    print(f"\nload average: start {load_start}; end {load_end}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2, default=str))
    if args.write_doc:
        cmd = "PYTHONPATH=. .venv/bin/python benchmarks/merge_single.py"
        cmd += f" --model-mb {args.model_mb:g}" if args.model_mb != 1000 else ""
        cmd += f" --experts {args.experts}" if args.experts != 4 else ""
        cmd += f" --tile-mb {args.tile_mb:g}" if args.tile_mb is not None else ""
        cmd += f" --repeat {args.repeat}" if args.repeat != 1 else ""
        cmd += f" --read {args.read}" if args.read else ""
        cmd += f" --write {args.write}" if args.write else ""
        how = ("mapped from the page cache and every page faulted in, as the merge reads them (`read: mmap`)"
               if read == "mmap" else "preadv, 16 MiB chunks")
        loads = sorted(r["kernel_load_s"] for r in raw["methods"].values())
        how_write = ("O_DIRECT through the merge's own DirectStream, as the merge writes" if write == "direct"
                     else "buffered pwrite")
        body = f"""Command: `{cmd} --write-doc`

Machine: {C.machine_line()}; shared with other engineers' jobs (load average {load_start} at the start,
{load_end} at the end).

Inputs: synthetic Llama-like checkpoints, base + {args.experts} experts, {C.fmt_bytes(out_bytes)} of bf16 weights each
({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']},
vocab {cfg['vocab_size']}; 3 shards), experts = base + 0.002 N(0, 1). {C.fmt_bytes(in_bytes)} read per pass,
{C.fmt_bytes(out_bytes)} written (bf16 out). Page cache warm (all inputs fit in RAM), output fsynced.
tile_mb {tile_label(tile_mb, len(models))}, read {read}, write {write}. Default method parameters (TIES density 0.2,
DARE p 0.9, dare_ties without extra trim). Each run is a fresh process calling `mergescale.merge`; time excludes
interpreter start, imports and loading the compiled kernels from numba's cache ({loads[0]:.2f}-{loads[-1]:.2f} s,
once per process). I/O floor: read every input tensor once ({how}) and write + fsync one output of the same size
({how_write}), single thread; one floor run right before every merge run, and each method is compared with the
floor run paired with its best run (the disk's write speed drifts). CPU: user + system seconds of the child over
the same span, all its threads; CPU / {cores} cores is the least wall time that much work can take on this
machine's {cores} cores, however well it overlaps. Peak RSS: the child's VmHWM, the kernel's high-water mark of its
resident set, mapped file pages included (one process, so exact; not polled, since a 50 Hz poller took
1.05-1.33 CPU-s per run from these 2 cores, benchmarks/poller_cost.py; includes ~{C.fmt_bytes(floor['base_rss'])}
of interpreter + torch after imports), the highest of a method's runs. Input GB/s = bytes read per pass / time.

{table}
"""
        C.replace_section(C.ROOT / "docs" / "BENCHMARKS.md", "Single-process merge", body, C.DOC_INTRO)
        print("updated docs/BENCHMARKS.md")
    shutil.rmtree(out_dir, ignore_errors=True)
    return 0


def tile_label(tile_mb: float | None, n_models: int) -> str:
    from mergescale.config import AUTO_TILE_MB_MAX, AUTO_TILES_MB

    if tile_mb is not None:
        return f"{tile_mb:g}"
    return f"default ({min(AUTO_TILE_MB_MAX, AUTO_TILES_MB / n_models):.3g} per model)"


def compare_checkouts(args, paths, tile_mb: float | None, out_dir: Path, prepare) -> int:
    """Each method's merge time (kernels loaded first) per checkout, alternating checkouts within each round."""
    print(f"load average {C.load_average()}")
    for label in args.methods:
        method, params = METHODS[label]
        spec = {"base": str(paths["base"]), "experts": [str(p) for p in paths["experts"]], "method": method,
                "parameters": params, "out": str(out_dir / "merged"), **({"tile_mb": tile_mb} if tile_mb else {})}
        if args.read:  # only when asked: an older checkout's config may not know the field
            spec["read"] = args.read
        if args.write:
            spec["write"] = args.write
        times: dict[Path, list[float]] = {co: [] for co in args.checkouts}
        for _ in range(args.rounds):
            for co in args.checkouts:
                try:
                    prepare()
                    times[co].append(run_child("merge", dict(spec), root=co.resolve())["time_s"])
                finally:
                    shutil.rmtree(out_dir / "merged", ignore_errors=True)
                    shutil.rmtree(out_dir / ".merged.partial", ignore_errors=True)
        for co, ts in times.items():
            print(f"{label:16s} {str(co):24s} " + " / ".join(f"{t:.2f}" for t in ts) + " s")
    print(f"load average {C.load_average()}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
