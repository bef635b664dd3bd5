"""Shared fixtures: tiny Llama checkpoints built locally once per session, and helpers to read and forge them.

Families (all float32 unless noted, random init from `mergescale.tiny`, >= 2 safetensors shards):
  family   hidden 64, 2 layers, BPE tokenizer; base + 3 experts (reference comparisons, I/O, CLI)
  micro    hidden 32, 1 layer, vocab 64, no tokenizer; base + 3 experts (cheap: many tile sizes)
  scaled   the family base + 2 experts whose task vectors have very different scales per tensor
  bf16     hidden 64 in bfloat16; base + 2 experts
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergescale.tiny import build_tiny_llama, make_expert

warnings.filterwarnings("ignore", category=DeprecationWarning)
# The tensors here are tiny: intra-op threads only add OpenMP barrier waits (seconds per merge on a loaded machine).
torch.set_num_threads(1)


@dataclass(frozen=True)
class Family:
    base: Path
    experts: list[Path]

    @property
    def expert_strs(self) -> list[str]:
        return [str(e) for e in self.experts]


def shard_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(model_dir.glob("*.safetensors"))


def import_vllm_or_skip() -> None:
    """At a vllm test module's top: a small CPU KV cache, and the module skipped only when vllm cannot be imported
    AND $CI is unset; in CI a missing vLLM fails the run instead of silently skipping."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken torchvision (see docs)
        if os.environ.get("CI"):
            raise RuntimeError(f"CI is set but vllm does not import: {e}") from e
        pytest.skip(f"vllm not importable ({e}); set CI=1 to make this an error", allow_module_level=True)


def load_sd(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, as stored (dtype kept)."""
    sd: dict[str, torch.Tensor] = {}
    for f in shard_files(model_dir):
        part = load_file(str(f))
        assert not set(part) & set(sd), f"tensor stored twice in {model_dir}"
        sd.update(part)
    return sd


def load_f32(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) for k, v in load_sd(model_dir).items()}


def header_dtypes(model_dir: str | Path) -> dict[str, str]:
    out = {}
    for f in shard_files(model_dir):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        out.update({k: v["dtype"] for k, v in header.items()})
    return out


def weight_map(model_dir: str | Path) -> dict[str, str]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    out = {}
    for f in shard_files(model_dir):
        with safe_open(str(f), "pt") as h:
            out.update({k: f.name for k in h.keys()})
    return out


def write_like(src: str | Path, dst: str | Path, sd: dict[str, torch.Tensor], *, index: bool = True) -> Path:
    """Write `sd` as a checkpoint laid out like `src` (same shard of each tensor that src has; new tensors go to
    the last shard) with src's config/tokenizer files. Used to forge experts with chosen values or defects."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, dst / f.name)
    wm = weight_map(src)
    last = sorted(set(wm.values()))[-1]
    groups: dict[str, dict[str, torch.Tensor]] = {}
    new_map = {}
    for name, t in sd.items():
        fname = wm.get(name, last)
        groups.setdefault(fname, {})[name] = t.contiguous()
        new_map[name] = fname
    for fname, part in groups.items():
        save_file(part, str(dst / fname), metadata={"format": "pt"})
    if index and len(groups) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    return dst


def merge(config: dict, out: str | Path, **kw) -> dict:
    import mergescale

    return mergescale.merge(mergescale.MergeConfig.model_validate(config), out, progress=False, **kw)


def no_output(out: str | Path) -> bool:
    """Neither the output directory nor its hidden partial directory exists."""
    out = Path(out)
    return not out.exists() and not (out.parent / f".{out.name}.partial").exists()


def replace_weights(dst: Path, src: Path) -> None:
    """Put src's shards in place of dst's: other weights of exactly the same layout (file names, sizes, headers),
    so the run key's fingerprint of the inputs (sizes and header hashes) cannot tell."""
    from mergescale.checkpoint.read import Checkpoint

    before = Checkpoint(dst).fingerprint()
    for f in shard_files(dst):
        assert f.read_bytes() != (src / f.name).read_bytes()
        shutil.copyfile(src / f.name, f)
    assert Checkpoint(dst).fingerprint() == before


def crash_merge(cfg: dict, out: Path, monkeypatch, at: int) -> None:
    """A single-process merge interrupted at its `at`-th merge_unit call (as a kill: the partial output stays),
    every unit before it journaled."""
    from mergescale.merge import driver, local, pipeline

    real, calls = pipeline.merge_unit, {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(local, "JOURNAL_EVERY_S", 0.0)
    monkeypatch.setattr(pipeline, "merge_unit", crashing)
    with pytest.raises(KeyboardInterrupt):
        driver.run_merge(cfg, out, progress=False)
    monkeypatch.setattr(pipeline, "merge_unit", real)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Family:
    root = tmp_path_factory.mktemp("family")
    base = build_tiny_llama(root / "base", seed=0, hidden=64, heads=2, max_shard_size="100KB")
    experts = [make_expert(base, root / f"expert{i}", seed=1 + i, max_shard_size="100KB") for i in range(3)]
    return Family(base, experts)


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> Family:
    root = tmp_path_factory.mktemp("micro")
    kw = dict(hidden=32, heads=1, layers=1, vocab_size=64, max_shard_size="20KB")
    base = build_tiny_llama(root / "base", seed=5, tokenizer=False, **kw)
    experts = [make_expert(base, root / f"expert{i}", seed=50 + i, max_shard_size="20KB") for i in range(3)]
    return Family(base, experts)


@pytest.fixture(scope="session")
def scaled(tmp_path_factory, family) -> Family:
    root = tmp_path_factory.mktemp("scaled")
    scales = {"mlp": 10.0, "embed_tokens": 0.1}
    experts = [
        make_expert(family.base, root / f"expert{i}", seed=20 + i, max_shard_size="100KB", tensor_scales=scales)
        for i in range(2)
    ]
    return Family(family.base, experts)


@pytest.fixture(scope="session")
def bf16(tmp_path_factory) -> Family:
    root = tmp_path_factory.mktemp("bf16")
    base = build_tiny_llama(root / "base", seed=3, dtype=torch.bfloat16, hidden=64, heads=2, max_shard_size="60KB")
    experts = [make_expert(base, root / f"expert{i}", seed=30 + i, max_shard_size="60KB") for i in range(2)]
    return Family(base, experts)


@pytest.fixture(scope="session")
def base_sd(family) -> dict[str, torch.Tensor]:
    return load_f32(family.base)


@pytest.fixture(scope="session")
def expert_sds(family) -> list[dict[str, torch.Tensor]]:
    return [load_f32(e) for e in family.experts]


def _task_registry():
    from mergescale.eval import tasks

    tasks.all_tasks()  # load the shipped registry first, so a snapshot holds it
    return tasks._TASKS


@pytest.fixture(autouse=True, scope="module")
def _restore_task_registry_per_module():
    """Tasks a test module registers (register_tasks) must not leak into later modules' view of the registry."""
    registry = _task_registry()
    saved = dict(registry)
    yield
    registry.clear()
    registry.update(saved)


@pytest.fixture(autouse=True)
def _restore_task_registry_per_test(_restore_task_registry_per_module):
    registry = _task_registry()
    saved = dict(registry)
    yield
    registry.clear()
    registry.update(saved)


# --- One Ray session per process ---------------------------------------------------------------------------------
# Ray does not support ray.shutdown() followed by another ray.init() in one process (mergescale/cluster/session.py,
# ray-project/ray#31145): a pytest process that cycled these modules' sessions crashed at exit after every test had
# passed. Each module that starts its own Ray (its fixture's ray.init settings, a multi-node Cluster) therefore runs
# its selected tests in a pytest process of its own; every other test must leave no Ray session behind.
OWN_RAY_SESSION = ("test_cluster_faults.py", "test_cluster_merge.py", "test_cluster_multinode.py", "test_eval_ray.py",
                   "test_merge_bytes.py", "test_push_study.py", "test_ray_workers.py",
                   "test_training_ray.py")
_CHILD_ENV = "MERGESCALE_TEST_OWN_RAY"  # set in such a child: its module runs in-process there


class _ChildFailed(Exception):
    pass


class OwnRaySessionRun(pytest.Item):
    """The selected tests of one OWN_RAY_SESSION module, run by a child pytest; passes when they all pass."""

    def __init__(self, *, nodeids, **kw):
        super().__init__(**kw)
        self.nodeids = nodeids
        # the child applies the per-test timeout (pyproject) to each of its tests; this item is all of them at once
        self.add_marker(pytest.mark.timeout(3600))

    def runtest(self):
        root = self.config.rootpath
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *self.nodeids]
        r = subprocess.run(cmd, cwd=root, env={**os.environ, _CHILD_ENV: "1"}, capture_output=True, text=True)
        tail = r.stdout.strip().splitlines()[-1:] or [""]
        self.user_properties.append(("child", tail[0]))
        if r.returncode != 0:
            raise _ChildFailed(f"{' '.join(cmd[3:])} exited {r.returncode}:\n{r.stdout[-20000:]}\n{r.stderr[-4000:]}")

    def repr_failure(self, excinfo):
        return str(excinfo.value) if isinstance(excinfo.value, _ChildFailed) else super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.name} ({len(self.nodeids)} test(s), own process)"


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: the child runs exactly what was selected
def pytest_collection_modifyitems(session, config, items):
    if os.environ.get(_CHILD_ENV):
        return
    out, groups = [], {}
    for item in items:
        if item.path.name in OWN_RAY_SESSION:
            if item.path.name not in groups:
                groups[item.path.name] = []
                out.append(item.path.name)  # placeholder: keeps the module's place in the order
            groups[item.path.name].append(item)
        else:
            out.append(item)
    items[:] = [OwnRaySessionRun.from_parent(groups[x][0].getparent(pytest.Module), name=x,
                                             nodeids=[i.nodeid for i in groups[x]]) if isinstance(x, str) else x
                for x in out]


@pytest.fixture(autouse=True)
def _no_ray_session_left_behind():
    yield
    ray = sys.modules.get("ray")
    if not os.environ.get(_CHILD_ENV) and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test left a Ray session in the shared pytest process: move its module to "
                    "OWN_RAY_SESSION in tests/conftest.py")


def pytest_terminal_summary(terminalreporter):
    """The tallies of the child processes, which the parent counts as one test per module."""
    lines = [f"{r.nodeid}: {v}" for kind in ("passed", "failed") for r in terminalreporter.stats.get(kind, [])
             if r.when == "call" for k, v in r.user_properties if k == "child"]
    if lines:
        terminalreporter.write_sep("-", "modules run in their own process (one Ray session each)")
        for line in lines:
            terminalreporter.write_line(line)
