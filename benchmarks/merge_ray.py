"""Distributed merge benchmark: mergescale on K = 1 and 2 Ray workers vs mergekit 0.1.5, on identical inputs.

    .venv/bin/python benchmarks/merge_ray.py                      # ~1 GB per model, base + 4 experts
    .venv/bin/python benchmarks/merge_ray.py --model-mb 64        # quick smoke test
    .venv/bin/python benchmarks/merge_ray.py --write-doc          # also update docs/BENCHMARKS.md

Inputs are the synthetic Llama-like checkpoints of benchmarks/merge_single.py (.bench/ckpt-<size>mb-v<N>/).
mergekit is installed into its own virtual environment, .bench/mergekit-venv (torch==2.13.0 first, so pip takes the
CPU build, then mergekit==0.1.5); it is never a dependency of mergescale. Each run is a fresh process tree:
mergescale calls `mergescale.cluster.merge.run_distributed_merge(config, out, workers=K)` in a child that starts its
own local Ray; mergekit runs `mergekit-yaml config.yml out --lazy-unpickle` on CPU with bf16 output. Each case
runs twice: once timed, with nothing polling it, and once for memory, polled every 50 ms over the whole process tree
(the driver, Ray's GCS/raylet/agents and every Ray worker): the largest sum of RSS, and the largest sum of PSS
(which counts pages shared between processes once). The poller's CPU would otherwise come out of the timed run.

Methods are matched to mergekit's semantics where they differ: linear = mergescale `average` (normalized weights),
task_arithmetic (lambda 1), TIES with per-tensor trim, density 0.2, and dare_ties with drop p 0.9 (mergekit density
0.1). The numbers differ slightly anyway (sign election by mass vs weighted mass is the same here with unit
weights; mergekit divides by the sum of weights, rescales DARE by L1 norm and draws its masks from torch's RNG).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MERGEKIT_VENV = C.BENCH / "mergekit-venv"
# CPU, lazy reads; the inputs have no tokenizer; no README; fixed seed for its DARE masks; torch's default threads.
MERGEKIT_FLAGS = ["--lazy-unpickle", "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                  "--random-seed", "0"]
# label -> (mergescale method, mergescale parameters, mergekit method, mergekit per-model parameters)
METHODS = {
    "linear": ("average", {}, "linear", {"weight": 1.0}),
    "task_arithmetic": ("task_arithmetic", {}, "task_arithmetic", {"weight": 1.0}),
    "ties (per-tensor)": ("ties", {"trim_scope": "tensor", "density": 0.2}, "ties", {"weight": 1.0, "density": 0.2}),
    "dare_ties": ("dare_ties", {"p": 0.9}, "dare_ties", {"weight": 1.0, "density": 0.1}),
}


# ------------------------------------------------------------------------------------------------------------
# mergekit


def ensure_mergekit(log=print) -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    log(f"installing mergekit 0.1.5 into {MERGEKIT_VENV} (torch==2.13.0 first, so pip keeps the CPU build)")
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["mergekit==0.1.5"], check=True)
    return exe


def mergekit_config(paths: dict, label: str) -> dict:
    _, _, method, params = METHODS[label]
    cfg: dict = {"merge_method": method, "dtype": "bfloat16", "out_dtype": "bfloat16"}
    models = [{"model": str(p), "parameters": dict(params)} for p in paths["experts"]]
    if method == "linear":
        cfg["models"] = models
    else:
        cfg["base_model"] = str(paths["base"])
        cfg["models"] = models
    return cfg


# ------------------------------------------------------------------------------------------------------------
# mergescale child


def child_mergescale(spec: dict) -> dict:
    from mergescale.cluster.merge import run_distributed_merge

    out = spec.pop("out")
    workers = spec.pop("workers")
    address = spec.pop("address", None)
    import ray

    started = not ray.is_initialized()
    t0 = time.perf_counter()
    manifest = run_distributed_merge(spec, out, workers=workers, address=address, overwrite=True, progress=False)
    if started:  # the call keeps the Ray it started (cluster/session.py); "wall" counts stopping it, as before
        ray.shutdown()
    return {"time_s": time.perf_counter() - t0, "timing": manifest["timing"]}


# ------------------------------------------------------------------------------------------------------------
# Parent


class RunningCluster:
    """A Ray head started once (`ray start --head --block`, its own session), as on a real cluster where merges
    are submitted to Ray that is already up. Its whole process tree (GCS, raylet, agents, workers) is added to
    the memory of every run against it; stopping it kills only that tree."""

    def __init__(self, env: dict, cpus: int):
        import socket

        import psutil

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            self.port = sk.getsockname()[1]
        self.env = {**env, "RAY_AUTH_MODE": "disabled"}  # Ray 2.60 token auth, off for head and driver alike
        self.temp = Path("/tmp") / f"ms-bench-ray-{os.getpid()}"
        ray_bin = Path(sys.executable).parent / "ray"
        self.proc = subprocess.Popen(
            [str(ray_bin), "start", "--head", f"--port={self.port}", f"--num-cpus={cpus}", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={self.temp}", "--block"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._ps = psutil
        t0 = time.time()
        while True:  # up when a driver can connect
            connect = f"import ray; ray.init(address='127.0.0.1:{self.port}'); ray.shutdown()"
            probe = subprocess.run([sys.executable, "-c", connect], env=self.env, capture_output=True, timeout=120)
            if probe.returncode == 0:
                break
            if time.time() - t0 > 120 or self.proc.poll() is not None:
                raise RuntimeError(f"ray head did not come up: {probe.stderr.decode()[-2000:]}")
            time.sleep(1)
        self.address = f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        try:
            head = self._ps.Process(self.proc.pid)
            return [head.pid] + [c.pid for c in head.children(recursive=True)]
        except self._ps.NoSuchProcess:
            return []

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(self.temp)], check=False)


def run_case(cmd: list[str], env: dict, out: Path, timeout: float, extra_pids_fn=None, rounds: int = 1,
             rounds_max_s: float = 120.0) -> dict:
    """Timed runs of the same command, not polled, then one run polled for memory (RSS and PSS of every process
    of the tree at 20 Hz). On 2 cores the poller took 4.0-4.2 CPU-s from a ~9 s Ray merge of 15 processes (a
    cost that grows with the processes polled; mergekit runs as one), so timing and memory come from separate
    runs, for both tools alike. The timed run is repeated `rounds` times (not once it took over rounds_max_s:
    the long mergekit runs are far from any target) and the median is reported, with every wall time. Returns
    the median timed run with the memory run's peaks and wall added."""

    def once(poll: bool) -> dict:
        r = C.run_measured(cmd, env=env, timeout=timeout, pss=True, extra_pids_fn=extra_pids_fn, poll=poll)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
        if r["rc"] != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (rc {r['rc']}):\n{r['stderr'][-4000:]}")
        return r

    timed = [once(False)]
    while len(timed) < rounds and timed[-1]["wall_s"] <= rounds_max_s:
        timed.append(once(False))
    polled = once(True)
    median = sorted(timed, key=lambda r: r["wall_s"])[(len(timed) - 1) // 2]  # the lower median of an even count
    return {**median, "walls": [r["wall_s"] for r in timed], "peak_rss": polled["peak_rss"],
            "peak_pss": polled["peak_pss"], "polled_wall_s": polled["wall_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-mb", type=float, default=1000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--no-running-cluster", action="store_true", help="only the cold runs (embedded Ray per merge)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--rounds", type=int, default=1, help="timed runs per case; the median is reported")
    ap.add_argument("--rounds-max-s", type=float, default=120.0, help="a case whose timed run took longer runs once")
    ap.add_argument("--write-doc", action="store_true",
                    help="replace the 'Distributed merge (Ray) vs mergekit' section")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(child_mergescale(json.loads(args._child))), flush=True)
        return 0

    import yaml

    paths = C.make_checkpoints(args.model_mb, args.experts)
    C.warm_kernels(args.experts)
    models = [paths["base"]] + paths["experts"]
    in_bytes = sum(C.model_bytes(p) for p in models)
    out_bytes = C.model_bytes(paths["base"])
    mk = None if args.skip_mergekit else ensure_mergekit()
    work = C.BENCH / "out-ray"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"inputs: base + {args.experts} experts, {C.fmt_bytes(out_bytes)} each; warming page cache "
          f"{C.warm_page_cache(models):.1f} s; load average {C.load_average()}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"}
    load_start = C.load_average()
    results: dict = {}
    cpus = os.cpu_count() or 1
    modes = ["cold"] + ([] if args.no_running_cluster else ["running"])
    tools = [f"mergescale K={k} ({mode})" for mode in modes for k in args.workers]
    cluster = None
    try:
        for label in args.methods:
            method, params, _, _ = METHODS[label]
            for mode in modes:
                # The head runs only during its own runs: an idle cluster must not slow the cold or mergekit runs.
                cl = cluster = RunningCluster(env, cpus) if mode == "running" else None
                for k in args.workers:
                    out = work / "merged"
                    # the machine's cores split among the K actors (K=1 gets all of them)
                    spec = {"base": str(paths["base"]), "experts": [str(p) for p in paths["experts"]], "method": method,
                            "parameters": params, "out": str(out), "workers": k,
                            "cluster": {"num_cpus": max(1, cpus // k)}, "address": cl.address if cl else None}
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
                    r = run_case(cmd, cl.env if cl else env, out, args.timeout, cl.pids if cl else None, args.rounds,
                                 args.rounds_max_s)
                    merge_s = r["result"]["timing"]["total_s"] if r["result"] else None
                    tool = f"mergescale K={k} ({mode})"
                    results[(label, tool)] = {"wall_s": r["wall_s"], "merge_s": merge_s, "rss": r["peak_rss"],
                                              "pss": r["peak_pss"], "polled_wall_s": r["polled_wall_s"],
                                              "walls": r["walls"]}
                    print(f"{label:18s} {tool}: wall {r['wall_s']:.1f} s (merge {merge_s:.1f} s; "
                          f"polled run {r['polled_wall_s']:.1f} s), "
                          f"peak RSS {C.fmt_bytes(r['peak_rss'])}, PSS {C.fmt_bytes(r['peak_pss'])}", flush=True)
                if cluster is not None:
                    cluster.stop()
                    cluster = None
            if mk is not None:
                out = work / "mergekit-out"
                cfg_path = work / f"mergekit-{METHODS[label][2]}.yml"
                cfg_path.write_text(yaml.safe_dump(mergekit_config(paths, label), sort_keys=False))
                cmd = [str(mk), str(cfg_path), str(out)] + MERGEKIT_FLAGS
                r = run_case(cmd, {**os.environ, "TQDM_DISABLE": "1"}, out, args.timeout, None, args.rounds,
                             args.rounds_max_s)
                results[(label, "mergekit 0.1.5")] = {"wall_s": r["wall_s"], "merge_s": None, "rss": r["peak_rss"],
                                                     "pss": r["peak_pss"], "polled_wall_s": r["polled_wall_s"],
                                                     "walls": r["walls"]}
                print(f"{label:18s} mergekit 0.1.5: wall {r['wall_s']:.1f} s (polled run {r['polled_wall_s']:.1f} s), "
                      f"peak RSS {C.fmt_bytes(r['peak_rss'])}, PSS {C.fmt_bytes(r['peak_pss'])}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
    load_end = C.load_average()

    headers = ["method", "tool", "wall (s)", "timed runs (s)", "merge only (s)", "input GB/s (wall)",
               "vs mergekit (wall)", "peak RSS, sum", "peak PSS, sum", "wall of the polled run (s)"]
    rows = []
    for label in args.methods:
        ref = results.get((label, "mergekit 0.1.5"))
        for tool in tools + (["mergekit 0.1.5"] if mk else []):
            r = results[(label, tool)]
            speed = f"{ref['wall_s'] / r['wall_s']:.2f}x" if ref else "-"
            rows.append([label, tool, f"{r['wall_s']:.1f}", " / ".join(f"{w:.1f}" for w in r["walls"]),
                         f"{r['merge_s']:.1f}" if r["merge_s"] is not None else "-",
                         f"{in_bytes / r['wall_s'] / 1e9:.3f}", speed, C.fmt_bytes(r["rss"]), C.fmt_bytes(r["pss"]),
                         f"{r['polled_wall_s']:.1f}"])
    table = C.markdown_table(headers, rows)
    print()
    print(table)
    print(f"\nload average: start {load_start}; end {load_end}")
    if args.json:
        args.json.write_text(json.dumps({f"{a} | {b}": v for (a, b), v in results.items()}, indent=2))
    if args.write_doc:
        cmd = "PYTHONPATH=. .venv/bin/python benchmarks/merge_ray.py"
        cmd += f" --model-mb {args.model_mb:g}" if args.model_mb != 1000 else ""
        cmd += f" --rounds {args.rounds}" if args.rounds != 1 else ""
        cmd += f" --rounds-max-s {args.rounds_max_s:g}" if args.rounds_max_s != 120 else ""
        body = f"""Command: `{cmd} --write-doc`

Machine: {C.machine_line()}; shared with other engineers' jobs (load average {load_start} at the start,
{load_end} at the end).

Inputs: the synthetic checkpoints of the single-process benchmark, base + {args.experts} experts,
{C.fmt_bytes(out_bytes)} of bf16 weights each, {C.fmt_bytes(in_bytes)} read, page cache warm; bf16 output, CPU
only. mergescale: a fresh process calls
`run_distributed_merge(config, out, workers=K)` with the machine's {cpus} cores split among K merge actors
(`cluster.num_cpus` = {cpus} / K). "cold": no Ray is running, so the call starts an embedded local Ray (`ray.init`,
~5 s here, plus shutdown) and everything is in "wall". "running": a Ray head started before that method's runs
(`ray start --head`, as on a cluster that `ray job submit` or a KubeRay RayJob targets), `address=` given; "wall"
is the driver process from start to exit, and the head's whole process tree (GCS, raylet, agents, workers) is
counted in its memory. "merge only" is the manifest's total_s (from asking for the actors, which start while the
driver validates the inputs, to the last durable unit: statistics and merge passes, not the commit).
mergekit 0.1.5 (own venv, torch 2.13.0 CPU): `mergekit-yaml config.yml out {' '.join(MERGEKIT_FLAGS)}`,
same models, `dtype: bfloat16`, `out_dtype: bfloat16`. Parameters: linear = normalized average (mergescale `average`),
task_arithmetic with lambda 1, TIES density 0.2 with per-tensor trim (mergekit's scope), dare_ties with drop p 0.9
(mergekit density 0.1), unit weights. Every case runs twice or more, for both tools alike: {args.rounds} timed
run(s) that nothing polls ("wall": the median, every run in "timed runs"; a run over {args.rounds_max_s:g} s is not
repeated), then a run for memory: the largest sum over the whole process tree, polled every 50 ms (Ray's GCS,
raylet, agents and workers included); PSS counts pages shared between processes once. The poller takes CPU from
the run it watches (4.0-4.2 CPU-s over a ~9 s Ray merge on these 2 cores; benchmarks/poller_cost.py), so that
run's wall is shown apart, in the last column. Input GB/s = bytes of all inputs / wall time.

{table}
"""
        C.replace_section(C.ROOT / "docs" / "BENCHMARKS.md", "Distributed merge (Ray) vs mergekit", body, C.DOC_INTRO)
        print("updated docs/BENCHMARKS.md")
    shutil.rmtree(work, ignore_errors=True)
    return 0



if __name__ == "__main__":
    sys.exit(main())
