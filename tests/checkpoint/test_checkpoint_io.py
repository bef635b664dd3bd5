"""Lazy checkpoint reads, the sharded writer, the manifest, dtypes, and loading the result with transformers."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import mergescale
from mergescale.checkpoint import read as ckpt_mod
from mergescale.checkpoint.output_dir import MANIFEST
from mergescale.checkpoint.read import Checkpoint
from tests.helpers import header_dtypes, load_f32, load_sd, merge, shard_files

# ----------------------------------------------------------------------------------------------------------
# Reading


def safetensors_meta(model_dir) -> dict:
    out = {}
    for f in shard_files(model_dir):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype(), f.name)
    return out


def test_open_reads_headers_only(family, monkeypatch):
    """Names, shapes, dtypes and files come from the headers; no tensor byte is read and no file kept open."""

    def no_data(*a, **k):
        raise AssertionError("tensor data read while opening")

    monkeypatch.setattr(ckpt_mod, "_read_into", no_data)
    monkeypatch.setattr(os, "preadv", no_data)
    c = Checkpoint(family.base)
    want = safetensors_meta(family.base)
    assert {n: (t.shape, t.dtype, t.file.name) for n, t in c.tensors.items()} == want
    assert len(c.files) >= 2 and c._fds == {}
    assert c.config["model_type"] == "llama"
    monkeypatch.undo()
    assert c.read("model.norm.weight").shape == want["model.norm.weight"][0]
    c.close()


@pytest.fixture(scope="module")
def full_fp32(family):
    return family.base, load_sd(family.base)


@pytest.fixture(scope="module")
def full_bf16(bf16):
    return bf16.base, load_sd(bf16.base)


@pytest.mark.parametrize("which", ["full_fp32", "full_bf16"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_read_rows_equals_slice(request, which, data):
    model_dir, full = request.getfixturevalue(which)
    name = data.draw(st.sampled_from(sorted(full)))
    rows = full[name].shape[0]
    start = data.draw(st.integers(0, rows))
    end = data.draw(st.integers(start, rows))
    with Checkpoint(model_dir) as c:
        got = c.read_rows(name, start, end)
        mapped = c.map_rows(name, start, end)  # mappings start on a page boundary; rows mostly do not
    for t in (got, mapped):
        assert t.dtype == full[name].dtype and t.shape == full[name][start:end].shape
        assert torch.equal(t.view(torch.uint8), full[name][start:end].view(torch.uint8))


def test_read_whole_tensors_bf16_and_fp32(family, bf16):
    for d in (family.base, bf16.base):
        full = load_sd(d)
        with Checkpoint(d) as c:
            assert set(c.tensors) == set(full)
            for n, t in full.items():
                assert torch.equal(c.read(n).view(torch.uint8), t.view(torch.uint8)), n
    assert set(header_dtypes(bf16.base).values()) == {"BF16"}


def test_read_rows_out_of_range_is_an_error(family):
    with Checkpoint(family.base) as c:
        rows = c.tensors["model.embed_tokens.weight"].rows
        with pytest.raises(IndexError, match="out of range.*model.embed_tokens.weight"):
            c.read_rows("model.embed_tokens.weight", rows - 1, rows + 1)
        with pytest.raises(IndexError):
            c.read_rows("model.embed_tokens.weight", 3, 2)


def test_map_rows_of_a_truncated_file_is_an_error(family, tmp_path):
    """Mapping pages past the end of a file would SIGBUS on first touch: map_rows faults them in up front and
    names the file instead."""
    full = load_sd(family.base)
    save_file(full, str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path) as c:
        last = max(c.tensors.values(), key=lambda t: t.offset)
        os.truncate(last.file, last.offset + last.rows_nbytes(0, 1) + 8)  # shortened after the header was read
        with pytest.raises(ckpt_mod.CheckpointError, match=f"{last.file}.*truncated"):
            c.map_rows(last.name, 0, last.rows)
        with pytest.raises(ckpt_mod.CheckpointError, match=f"{last.file}.*truncated"):
            c.read_rows(last.name, 0, last.rows)


def test_madvise_reaches_the_kernel_and_reports_its_errno(tmp_path):
    """_madvise is madvise(2) itself (through ctypes, so the GIL is released while a cold populate waits for the
    disk): 0 on a mapped range, the errno of an advice the kernel rejects."""
    f = tmp_path / "pages.bin"
    f.write_bytes(bytes(range(256)) * 64)
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        a = np.frombuffer(mm, np.uint8)
        assert ckpt_mod._madvise(a, mmap.MADV_WILLNEED) == 0
        assert ckpt_mod._madvise(a, 12345) == errno.EINVAL
        assert bytes(a[:256]) == bytes(range(256))
        del a
        mm.close()


def test_map_rows_without_populate_read_touches_every_page(family, monkeypatch):
    """Kernels before Linux 5.14 reject MADV_POPULATE_READ (EINVAL): map_rows then touches every page itself, and
    the rows are the same as read_rows'."""
    seen = []

    def old_kernel(mapped, advice):
        seen.append(advice)
        return errno.EINVAL if advice == ckpt_mod.MADV_POPULATE_READ else 0

    monkeypatch.setattr(ckpt_mod, "_madvise", old_kernel)
    with Checkpoint(family.base) as c:
        for name, info in c.tensors.items():
            if info.rows:
                r = min(3, info.rows)
                assert torch.equal(c.map_rows(name, 1 if info.rows > 1 else 0, r).view(torch.uint8),
                                   c.read_rows(name, 1 if info.rows > 1 else 0, r).view(torch.uint8)), name
    assert ckpt_mod.MADV_POPULATE_READ in seen


@pytest.mark.parametrize("filename", ["model.safetensors", "weights.safetensors"])
def test_single_file_checkpoint(family, tmp_path, filename):
    full = load_sd(family.base)
    d = tmp_path / "single"
    d.mkdir()
    save_file(full, str(d / filename), metadata={"format": "pt"})
    (d / "config.json").write_text((family.base / "config.json").read_text())
    with Checkpoint(d) as c:
        assert [f.name for f in c.files] == [filename]
        for n, t in full.items():
            assert torch.equal(c.read_rows(n, 1, 3) if t.dim() else c.read(n), t[1:3] if t.dim() else t)
    # A single-file expert merges with sharded ones.
    out = tmp_path / "out"
    merge({"method": "average", "experts": [str(d), str(family.base)]}, out)
    got = load_f32(out)
    assert all(torch.equal(got[n], full[n]) for n in full)


def test_stored_float_dtype_is_a_cheap_hint(family, bf16, tmp_path):
    """What a merge actor warms its kernels for: the first floating tensor's dtype, from one header; None (never an
    error: validation reports bad inputs) when there is nothing cheap to read."""
    assert ckpt_mod.stored_float_dtype(family.base) == "F32"
    assert ckpt_mod.stored_float_dtype(str(bf16.base)) == "BF16"
    single = tmp_path / "single"
    single.mkdir()
    save_file({"a": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(3, dtype=torch.bfloat16)},
              str(single / "w.safetensors"))
    assert ckpt_mod.stored_float_dtype(single) == "BF16"  # skips the integer tensor
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00")
    for spec in ("org/not-downloaded", tmp_path / "missing", tmp_path / "empty", tmp_path / "corrupt"):
        assert ckpt_mod.stored_float_dtype(spec) is None, spec


# ----------------------------------------------------------------------------------------------------------
# Writing


@pytest.fixture(scope="module")
def merged(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("written") / "merged"
    manifest = merge({"method": "ties", "base": str(family.base), "experts": family.expert_strs,
                      "parameters": {"density": 0.3}, "out_shard_size": "70KB", "seed": 4}, out)
    return out, manifest


def test_writer_shards_and_index(merged, family):
    out, _ = merged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    meta = safetensors_meta(out)
    assert {n: f for n, (_, _, f) in meta.items()} == index["weight_map"]
    assert set(meta) == set(safetensors_meta(family.base))
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as h:
            keys = list(h.keys())
            nbytes = sum(torch.Size(h.get_slice(k).get_shape()).numel() * 4 for k in keys)  # all F32
        assert nbytes <= 70_000 or len(keys) == 1, shard  # a tensor over the limit goes alone, as in HF
        total += nbytes
    assert index["metadata"]["total_size"] == total


def test_writer_single_shard_without_index(family, tmp_path):
    out = tmp_path / "out"
    merge({"method": "average", "experts": family.expert_strs, "out_shard_size": "1GB"}, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert set(load_sd(out)) == set(load_sd(family.base))


def test_metadata_files_copied(merged, family):
    out, _ = merged
    names = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    copied = [f for f in names if (family.base / f).exists()]
    assert "tokenizer.json" in copied and "generation_config.json" in copied
    for f in copied:
        assert (out / f).read_bytes() == (family.base / f).read_bytes(), f
    assert json.loads((out / "config.json").read_text()) == json.loads((family.base / "config.json").read_text())
    assert not list(out.glob("*.partial")) and not (out / "done.journal").exists() and not (out / "run.json").exists()
    assert not (out.parent / f".{out.name}.partial").exists()


def test_manifest_contents(merged, family):
    out, manifest = merged
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["mergescale_version"] == mergescale.__version__
    cfg = on_disk["config"]
    assert cfg["method"] == "ties" and cfg["parameters"] == {"density": 0.3} and cfg["seed"] == 4
    assert cfg["base"] == str(family.base) and [e["path"] for e in cfg["experts"]] == family.expert_strs
    # Input fingerprints: every weight file of every input with its size and header hash.
    models = [(on_disk["inputs"]["base"], family.base)] + list(zip(on_disk["inputs"]["experts"], family.experts))
    for entry, path in models:
        assert entry["path"] == str(path)
        assert set(entry["files"]) == {f.name for f in shard_files(path)}
        for fname, fp in entry["files"].items():
            raw = (path / fname).read_bytes()
            n = int.from_bytes(raw[:8], "little")
            assert fp == {"size": len(raw), "header_sha256": hashlib.sha256(raw[8 : 8 + n]).hexdigest()}
    # Output digests: every shard, checked against hashlib.
    assert set(on_disk["outputs"]) == {p.name for p in out.glob("*.safetensors")}
    for name, entry in on_disk["outputs"].items():
        raw = (out / name).read_bytes()
        assert entry == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def test_output_loads_with_transformers(merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = merged
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("the movie was great", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())
    sd = load_f32(out)
    for n, p in model.state_dict().items():
        assert torch.equal(p, sd[n]), n


def test_out_dtype_bfloat16(family, tmp_path):
    out = tmp_path / "out"
    merge({"method": "task_arithmetic", "base": str(family.base), "experts": family.expert_strs,
           "out_dtype": "bfloat16", "parameters": {"lambda": 0.5}}, out)
    assert set(header_dtypes(out).values()) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # Same merge in float32, rounded to bf16 once.
    ref = tmp_path / "ref"
    merge({"method": "task_arithmetic", "base": str(family.base), "experts": family.expert_strs,
           "parameters": {"lambda": 0.5}}, ref)
    got, want = load_sd(out), load_sd(ref)
    for n in want:
        assert torch.equal(got[n], want[n].to(torch.bfloat16)), n
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16


def test_default_dtype_follows_base(family, bf16, tmp_path):
    merge({"method": "average", "experts": bf16.expert_strs}, tmp_path / "b")
    assert set(header_dtypes(tmp_path / "b").values()) == {"BF16"}
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == json.loads(
        (bf16.base / "config.json").read_text())
    merge({"method": "average", "experts": family.expert_strs}, tmp_path / "f")
    assert set(header_dtypes(tmp_path / "f").values()) == {"F32"}


def test_dtype_table_agrees_with_torch():
    """Headers are read without torch, so the dtype table carries each code's size itself: it must be torch's."""
    from mergescale.checkpoint.read import SAFETENSORS_DTYPES, safetensors_dtype, torch_dtype

    for code, (size, _) in SAFETENSORS_DTYPES.items():
        dt = torch_dtype(code)
        assert torch.empty((), dtype=dt).element_size() == size, code
        assert safetensors_dtype(dt) == code
        assert safetensors_dtype(SAFETENSORS_DTYPES[code][1]) == code  # by name, as config.out_dtype gives it
    with pytest.raises(ValueError, match="no safetensors dtype"):
        safetensors_dtype(torch.complex64)


def _rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="needs glibc's malloc_trim")
def test_release_free_heap_returns_freed_blocks_to_the_os():
    """Blocks freed below a live one stay resident (glibc trims the heap only from its top) until
    release_free_heap, which the merge loops call before the first unit of every split tensor."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(100_000) for _ in range(1200)]  # below the mmap threshold: from the heap
    for b in blocks:
        ctypes.memset(b, 1, 100_000)
    for b in blocks[:-1]:  # the last block pins the heap's top
        libc.free(b)
    before = _rss_bytes()
    ckpt_mod.release_free_heap()
    after = _rss_bytes()
    libc.free(blocks[-1])
    assert before - after > 60e6, (before, after)
