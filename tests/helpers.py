"""Helpers shared by test modules: read, compare and forge checkpoints, run a merge, read errors.

Imported one way everywhere: `from tests.helpers import ...` (tests/ is a package; pytest puts the repo root on the
path). Fixtures live in the conftest.py files; plain functions live here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


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


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def shard_digests(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def manifest_digests(manifest: dict) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in manifest["outputs"].items()}


def error_line(capsys) -> str:
    """The last line a CLI command wrote to stderr, which must hold no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def slow_local_ray(unit_delay_s: float):
    """A generator for a module fixture: a local 2-CPU Ray whose merge actors sleep `unit_delay_s` per unit
    (MERGESCALE_UNIT_DELAY_S, inherited by this Ray's worker processes only), so a test's kill lands mid-merge."""
    import ray

    from mergescale.cluster.worker import UNIT_DELAY_ENV

    os.environ[UNIT_DELAY_ENV] = str(unit_delay_s)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        del os.environ[UNIT_DELAY_ENV]
    yield
    ray.shutdown()
