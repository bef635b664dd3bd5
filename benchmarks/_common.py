"""Shared by the merge benchmarks: synthetic Llama-like checkpoints (cached under .bench/), subprocess runs with
peak-RSS polling over the whole process tree, and markdown tables for docs/BENCHMARKS.md.

Nothing here is imported by mergescale itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
GEN_VERSION = 1  # bump when the generator changes, so cached checkpoints are rebuilt


# ------------------------------------------------------------------------------------------------------------
# Synthetic checkpoints


def llama_shape(model_mb: float) -> dict:
    """A Llama-2-like config whose bf16 weights take about `model_mb` MB (10**6 bytes)."""
    params = model_mb * 1e6 / 2
    for hidden in (4096, 3072, 2048, 1536, 1024, 768, 512, 256):
        # embeddings + lm_head take at most a quarter of the weights, and there are at least 8 layers
        vocab = min(32000, int(0.25 * params / (2 * hidden)) // 64 * 64)
        inter = int(hidden * 8 / 3 + 255) // 256 * 256
        per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
        layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
        if layers >= 8 and vocab >= 4096:
            break
    heads = max(1, hidden // 128)
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads}


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def _save_model(out: Path, cfg: dict, tensors_fn, shard_bytes: int) -> None:
    """Write sharded safetensors + index + config.json, tensor by tensor (memory: one shard)."""
    import torch
    from safetensors.torch import save_file

    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = tensor_specs(cfg)
    groups, size = [[]], 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    k = len(groups)
    weight_map, total = {}, 0
    for g, group in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{k:05d}.safetensors"
        shard = {name: tensors_fn(name, shape) for name, shape in group}
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        for name in shard:
            weight_map[name] = fname
            total += shard[name].numel() * 2
        del shard
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, **cfg,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


def _stable_seed(*parts) -> int:
    import zlib

    return zlib.crc32("\x00".join(map(str, parts)).encode())


def make_checkpoints(model_mb: float, n_experts: int = 4, delta: float = 2e-3, log=print) -> dict:
    """Base + n_experts synthetic Llama-like bf16 checkpoints under .bench/, reused across runs.

    Base weights ~ N(0, 0.02) (norms ~ 1); expert i = base + delta * N(0, 1), each with its own seeds."""
    import torch

    cfg = llama_shape(model_mb)
    root = BENCH / f"ckpt-{model_mb:g}mb-v{GEN_VERSION}"
    shard_bytes = max(32 * 10**6, int(model_mb * 1e6 / 3))  # about 3 shards per model
    paths = {"base": root / "base", "experts": [root / f"expert_{i}" for i in range(n_experts)], "config": cfg}
    todo = [("base", paths["base"])] + [(f"expert_{i}", p) for i, p in enumerate(paths["experts"])]
    todo = [(role, p) for role, p in todo if not (p / "model.safetensors.index.json").exists()]
    if not todo:
        return paths
    torch.set_num_threads(os.cpu_count() or 1)

    def base_tensor(name, shape):
        g = torch.Generator().manual_seed(_stable_seed("base", name))
        if len(shape) == 1:
            return (1.0 + 0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)

    for role, p in todo:
        t0 = time.time()
        if role == "base":
            fn = base_tensor
        else:
            def fn(name, shape, role=role):
                g = torch.Generator().manual_seed(_stable_seed(role, name))
                b = base_tensor(name, shape).to(torch.float32)
                b += delta * torch.randn(shape, generator=g)
                return b.to(torch.bfloat16)
        _save_model(p, cfg, fn, shard_bytes)
        log(f"generated {p} in {time.time() - t0:.1f} s")
    return paths


def warm_kernels(n_experts: int) -> None:
    """Compile mergescale's numba kernels for bf16 tiles (or load them from numba's on-disk cache) before any timed
    run, so the timings are the steady state; a fresh install pays the compile once, on its first merge."""
    from mergescale.merge import kernels

    t0 = time.time()
    kernels.warm_up(n_experts)
    print(f"numba kernels compiled or loaded from cache in {time.time() - t0:.1f} s", flush=True)


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def warm_page_cache(paths: list[Path]) -> float:
    """Read every weight file once so every timed run starts from the same (warm) page cache."""
    t0 = time.time()
    buf = bytearray(16 * 2**20)
    for p in paths:
        for f in sorted(Path(p).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.time() - t0


def drop_page_cache(paths: list[Path]) -> float:
    """Evict every weight file of these models from the page cache (posix_fadvise DONTNEED; clean pages only,
    which these are: nothing writes them) and return the fraction of their bytes still cached afterwards, so a
    run then reads its inputs from the disk, as a merge of models larger than RAM does."""
    files = [f for p in paths for f in sorted(Path(p).glob("*.safetensors"))]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # DONTNEED skips dirty pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return cached_fraction(files)


def cached_fraction(files: list[Path]) -> float:
    """Fraction of the files' bytes resident in the page cache (mincore on a read-only mapping: no root needed)."""
    import ctypes
    import mmap

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    cached = total = 0
    for f in files:
        size = os.path.getsize(f)
        if size == 0:
            continue
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as mm:
            addr = np.frombuffer(mm, np.uint8).ctypes.data  # mapping only: no page is touched
            vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {f}")
            cached += int((np.frombuffer(vec.raw, np.uint8) & 1).sum()) * mmap.PAGESIZE
        total += size
    return min(cached / total, 1.0) if total else 0.0


# ------------------------------------------------------------------------------------------------------------
# Running a command and measuring it


def _tree(root_pid: int, extra_pids=()):
    import psutil

    try:
        procs = [psutil.Process(root_pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for pid in extra_pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return list({p.pid: p for p in procs}.values())


def tree_rss(root_pid: int, extra_pids=(), pss: bool = False) -> tuple[int, int]:
    """(sum of RSS, sum of PSS or 0) over a process and all its descendants (plus extra pids)."""
    import psutil

    rss = pss_total = 0
    for p in _tree(root_pid, extra_pids):
        try:
            if pss:
                m = p.memory_full_info()
                rss += m.rss
                pss_total += m.pss
            else:
                rss += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return rss, pss_total


class RSSPoller:
    """Polls tree_rss every `interval` s in a thread; `peak` / `peak_pss` are the largest sums seen."""

    def __init__(self, pid: int, interval: float = 0.02, extra_pids_fn=None, pss: bool = False):
        self.pid, self.interval, self.extra, self.pss = pid, interval, extra_pids_fn, pss
        self.peak = self.peak_pss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            extra = self.extra() if self.extra else ()
            rss, pss = tree_rss(self.pid, extra, self.pss)
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None, extra_pids_fn=None,
                 cwd: Path | None = None, pss: bool = False, poll: bool = True) -> dict:
    """Run cmd (in its own session, so all its processes can be found and stopped); returns wall time, polled peak
    tree RSS (and PSS), return code, stdout/stderr and the last JSON line of stdout.

    poll=False runs it without the poller (peaks 0): polling is not free on these 2 cores. Each poll scans /proc
    to find the tree and reads every process's memory (PSS walks its page tables): measured here
    (benchmarks/poller_cost.py), 1.05-1.33 CPU-s over a one-process TIES merge (8-10 s from start to exit) at
    50 Hz, and 4.0-4.2 CPU-s over a K=1 Ray merge (~9 s, 15 processes) with PSS at 20 Hz. That CPU is taken
    from the run being timed, and the cost grows with the number of processes polled. So timed runs are not
    polled."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    with (RSSPoller(proc.pid, interval=0.05 if pss else 0.02, extra_pids_fn=extra_pids_fn, pss=pss) if poll
          else contextlib.nullcontext(RSSPoller(proc.pid))) as poller:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
    wall = time.time() - t0
    result = None
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    return {"wall_s": wall, "peak_rss": poller.peak, "peak_pss": poller.peak_pss, "rc": proc.returncode,
            "stdout": out, "stderr": err, "result": result}


def machine_line() -> str:
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except Exception:  # noqa: BLE001
        mem = "?"
    return (f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores, {mem} RAM, no GPU, "
            f"Python {platform.python_version()}")


def cpu_model() -> str:
    """The CPU's name, family and model from /proc/cpuinfo (machines of one name differ by generation)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return "(CPU unknown)"
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# Ends the part of a section that --write-doc generates (its command, setup and table). What follows it, up to the
# next '## ' section, is written by hand (readings, older tables kept with their commits, subsections) and is kept.
GENERATED_END = "<!-- end of the generated part: --write-doc replaces the text above and keeps the text below -->"


def replace_section(doc: Path, title: str, body: str, intro: str) -> None:
    """Replace the generated part of the '## title' section of doc with body (create doc/section if missing).

    The generated part runs from the heading to the GENERATED_END line; the hand-written text after that line is
    kept. A section without the line keeps everything from its first '### '/'#### ' heading on. Other sections
    are left as they are."""
    text = doc.read_text() if doc.exists() else intro.rstrip() + "\n"
    head = f"## {title}"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == head), None)
    new = [head, ""] + body.strip().splitlines() + ["", GENERATED_END, ""]
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += new
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        marker = next((j for j in range(start + 1, end) if lines[j].strip() == GENERATED_END), None)
        if marker is not None:
            kept = lines[marker + 1:end]
        else:
            sub = next((j for j in range(start + 1, end) if lines[j].startswith(("### ", "#### "))), end)
            kept = lines[sub:end]
        while kept and not kept[0].strip():
            kept = kept[1:]
        if kept and end < len(lines) and kept[-1].strip():
            kept = kept + [""]
        lines[start:end] = new + kept
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines).rstrip() + "\n")


DOC_INTRO = """# Benchmarks

Measured numbers for mergescale, with the exact commands to reproduce them. Every section names its machine and
the load average while it ran: the development machine is shared (2 cores), so timings are noisy; compare numbers
within one table, not across tables.
"""


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def python_exe() -> str:
    return sys.executable
