"""Every method's output bytes, pinned: the single-process merge and the Ray merge (2 actors) of fixed inputs must
give shards with exactly the sha256s recorded here (from the code before the merge pipeline was refactored, issue
31), for bf16 and float32 inputs.

The inputs are written by this file from integer hashes (no torch or numpy random streams, no transformers), so
their bytes are the same on every machine. Their tensors are sized to take each path of the merge at tile_mb 2
(524,288 float32 elements per model and unit):
  embed   [1024, 512]  one unit, large enough for TIES's sampled one-pass select-and-merge
  up      [1280, 512]  two units: per-tensor TIES holds it (single process) or selects first (Ray, float16 output)
  k_proj  [160, 128]   one unit over the kthvalue limit: the streaming selection inside the merge
  q_proj  [96, 64]     one small unit: kthvalue
  norm    [512]        1-D;  scale []: a scalar;  position_ids int64: copied
The Ray part runs in this module's own process (OWN_RAY_SESSION in tests/conftest.py), one Ray session for all of it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import mergescale

pytestmark = pytest.mark.ray

TILE_MB = 2.0
TENSORS = {  # name: (shape, scale of the experts' task vectors)
    "model.embed_tokens.weight": ((1024, 512), 0.02),
    "model.layers.0.mlp.up_proj.weight": ((1280, 512), 0.05),
    "model.layers.0.self_attn.k_proj.weight": ((160, 128), 0.01),
    "model.layers.0.self_attn.q_proj.weight": ((96, 64), 0.03),
    "model.norm.weight": ((512,), 0.01),
    "model.scale": ((), 0.5),
}
INT_TENSOR = "model.position_ids"


def _mix(x: np.ndarray) -> np.ndarray:
    """lowbias32 on uint32 lanes (wrapping arithmetic)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _noise(seed: int, n: int) -> np.ndarray:
    """n float64 values of mean 0 and deviation ~1 (a sum of 4 uniforms), a function of (seed, index) alone."""
    i = np.arange(n, dtype=np.uint32)
    total = np.zeros(n)
    for k in range(4):
        h = _mix(i ^ _mix(np.full(n, seed * 8 + k + 1, np.uint32)))
        total += (h >> np.uint32(8)).astype(np.float64) / 2**24
    return (total - 2.0) * 1.7


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, rounding to nearest even (finite values)."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16)).astype(np.uint16)


def write_model(path: Path, model: int, dtype: str) -> Path:
    """Model 0 is the base; model i > 0 is the base plus a task vector, a fifth of whose entries are exactly 0."""
    path.mkdir(parents=True)
    header, blobs, offset = {}, [], 0
    for t, (name, (shape, scale)) in enumerate(TENSORS.items()):
        n = int(np.prod(shape))
        values = _noise(100 * t, n) * 0.02
        if model:
            tau = _noise(100 * t + model, n) * scale
            tau[_mix(np.arange(n, dtype=np.uint32) + np.uint32(7 * model)) % np.uint32(5) == 0] = 0.0
            values = values + tau
        raw = (_bf16_bits(values) if dtype == "BF16" else values.astype(np.float32)).tobytes()
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    raw = np.arange(64, dtype=np.int64).tobytes()
    header[INT_TENSOR] = {"dtype": "I64", "shape": [64], "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    head = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("fixed")
    return {dtype: [write_model(root / f"{dtype}-{m}", m, dtype) for m in range(4)] for dtype in ("BF16", "F32")}


CASES = {  # name: (method, parameters, expert weights or None, experts, extra config)
    "average": ("average", {}, [1.0, 0.5, 2.0], 3, {}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}, [1.0, 1.0, 0.5], 3, {}),
    "ties_global": ("ties", {"density": 0.3, "trim_scope": "global"}, None, 3, {}),
    "ties_tensor_held": ("ties", {"density": 0.3, "trim_scope": "tensor", "sign": "count"}, None, 3, {}),
    "ties_tensor_f16_out": ("ties", {"density": 0.3, "trim_scope": "tensor"}, None, 3, {"out_dtype": "float16"}),
    "dare_linear": ("dare_linear", {"p": 0.4, "lambda": 0.8}, None, 3, {}),
    "dare_ties_tensor": ("dare_ties", {"p": 0.3, "density": 0.5, "trim_scope": "tensor"}, None, 2, {}),
    "dare_ties_no_trim": ("dare_ties", {"p": 0.5}, None, 3, {}),
    "slerp": ("slerp", {"t": 0.3}, None, 2, {}),
    "breadcrumbs_global": ("breadcrumbs", {"density": 0.8, "gamma": 0.05, "trim_scope": "global"}, [1.0, 0.5, 1.5], 3,
                           {}),
    "model_stock": ("model_stock", {}, None, 3, {}),
}

# sha256 over the sorted (shard name, shard sha256) pairs of each output, recorded from the code before issue 31
EXPECTED: dict[str, str] = {
    "average-BF16": "31ab723f2e4bd97f73674bb860c1faa0b679dbced8a50d52dbbfbb05e47522ad",
    "average-F32": "ee23350e92ba552646612797ae620c25bd98b9938ffe37f111c654b2cb2005e3",
    "breadcrumbs_global-BF16": "ed1f2128b5effa0fd1a7871a871758dddc8c3546ad4f6913d4d067cde74183f3",
    "breadcrumbs_global-F32": "999c507b33922e2ecc53d568dffd130669a5e2431b3d3841ec7f823ab6b54dd5",
    "dare_linear-BF16": "86e451157b5e7c4bf5da896becbda47f1fb533daabcf00da20f8faee35edbff5",
    "dare_linear-F32": "5ec3b4116252ac24c290a3c7d88d2661e8b9dcb8b7e1aa7a295c36af7d14ecc8",
    "dare_ties_no_trim-BF16": "139335bd30ed915a5f0ccf26b341da5e1647d311ebe26024c48b7638d849a27c",
    "dare_ties_no_trim-F32": "e97ae754907072a1c9dba35bc5ab9c2fe0305dec2678ed7c023a003649ada17c",
    "dare_ties_tensor-BF16": "d46885aadd4ab71049b370464bde5ca750bfd55a5da7642c464e1e549516b2e4",
    "dare_ties_tensor-F32": "2fc4285bf35ae62e7a0a628c68dbf2d23f7af8a709371107d30fa9ef2f4c4341",
    "model_stock-BF16": "05975221ad8f49d311b90cd9fb90fd67c6aa92e5954c4e23c3732fc5eebcc065",
    "model_stock-F32": "9c83aab7e7304ce67f40d8daaa172c77d5fc5b7a70a2dea0e7e4cc0ee4193cdb",
    "slerp-BF16": "d5fd23a550ff751459a36b24db8780db1105f671855b598319b1820c33fa3a8e",
    "slerp-F32": "19190e404c3de6e71d336d9181eed983b1523065924f6fa347efd39a8675e293",
    "task_arithmetic-BF16": "acb7b71683befb5d887c35e7096e22356aa15fa1bad5a05302646f34c66c7357",
    "task_arithmetic-F32": "9f308501aaee6ad28994bafa71cdfc3034ec517c7e4e79dd45eec2a7c2fb4bb0",
    "ties_global-BF16": "153543760fe7e43ca26215db79b983214c042f114f63be6e5ec84b969374b9ff",
    "ties_global-F32": "5315185f84a3efbf207a29cfb411a88c3c118282c88ed2379f1b0ad576110ec8",
    "ties_tensor_f16_out-BF16": "e3fd092e66f2a375fa08ea774585b03708c53c1bcda1d7a0bb090eaf64baa7bf",
    "ties_tensor_f16_out-F32": "f88c2393af54a704277b4995e833e52bfa4664ee7f5d88cf3b306b5a55c8c4b5",
    "ties_tensor_held-BF16": "b3d24857a413de465264acb81a455f8030918bf83f20478a1ed6ad06e9f13f99",
    "ties_tensor_held-F32": "ec2febea5080fbbf7017bd6aeba7805402f6f8df053e0fb05b5ff88a06a134d5",
}


def config_for(models: dict, dtype: str, case: str) -> dict:
    method, params, weights, n, extra = CASES[case]
    base, *experts = models[dtype]
    experts = [str(e) for e in experts[:n]]
    if weights is not None:
        experts = [{"path": e, "weight": w} for e, w in zip(experts, weights)]
    return {"base": str(base), "experts": experts, "method": method, "parameters": params, "tile_mb": TILE_MB,
            "out_shard_size": "1MB", "seed": 11, "cluster": {"num_cpus": 1}, **extra}


def output_digest(out: Path) -> str:
    shards = sorted(out.glob("*.safetensors"))
    assert shards, f"no shards in {out}"
    pairs = [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in shards]
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_single_process_bytes_are_pinned(models, tmp_path, case, dtype):
    out = tmp_path / "out"
    mergescale.merge(config_for(models, dtype, case), out, progress=False)
    assert output_digest(out) == EXPECTED.get(f"{case}-{dtype}"), f"{case}-{dtype}"


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ray_bytes_are_pinned(models, local_ray, tmp_path, case, dtype):
    out = tmp_path / "out"
    mergescale.merge(config_for(models, dtype, case), out, workers=2, progress=False)
    assert output_digest(out) == EXPECTED.get(f"{case}-{dtype}"), f"{case}-{dtype}"
