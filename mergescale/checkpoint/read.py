"""Lazy reads of Hugging Face model directories (single or sharded safetensors; pickle only when asked).

Opening a checkpoint parses only the safetensors headers: names, shapes, dtypes and byte offsets. A row range of a
tensor is one contiguous byte range, read straight into a tensor's memory with `preadv` (`read_rows`) or mapped
from the page cache (`map_rows`), so memory is bounded by the rows asked for, never by the tensor or the model.

One module for one format's reader, a little over 400 lines: the header parse, the two read paths and their error
paths share TensorInfo's byte arithmetic, and the pickle fallback (opt-in) yields the same view of a checkpoint.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Headers, names, shapes and dtypes need no torch: a Ray driver validates and plans a merge with this module
# without loading torch (its actors load it). Only the reads below import it.

log = logging.getLogger(__name__)

# safetensors dtype code -> (bytes per element, torch dtype name)
SAFETENSORS_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
    "BOOL": (1, "bool"), "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER = 100 * 2**20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python's mmap module may not name it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing). glibc keeps freed
    blocks for reuse, which is what makes a fresh output tile cheap (a new page costs a fault and a zeroing, ~0.8
    s per GB on a VM here); but blocks of sizes no later tile fits stay resident meanwhile."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _madvise(mapped: np.ndarray, advice: int) -> int:
    """madvise(2) over a mapped array (page-aligned start): 0, or the errno. Through ctypes, which releases the GIL
    for the call; mmap.madvise holds it, and populating pages that are not cached waits for the disk (~40 ms per
    64 MB here), which froze every other thread of the process (the merge's kernels and writer) meanwhile."""
    if _libc().madvise(mapped.ctypes.data, mapped.nbytes, advice) == 0:
        return 0
    return ctypes.get_errno()


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code ("BF16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, SAFETENSORS_DTYPES[code][1])


def safetensors_dtype(dtype: torch.dtype | str) -> str:
    """The safetensors code of a torch dtype or its name (torch.bfloat16 or "bfloat16" -> "BF16")."""
    name = str(dtype).removeprefix("torch.")
    for code, (_, torch_name) in SAFETENSORS_DTYPES.items():
        if torch_name == name:
            return code
    raise ValueError(f"no safetensors dtype for {dtype}")


class CheckpointError(ValueError):
    """A model directory or file that cannot be used; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the tensor data in `file`
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def rows(self) -> int:
        """Tiles are row ranges of dim 0; a scalar is one row."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return self.numel // self.rows if self.rows else 0

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def rows_nbytes(self, start: int, end: int) -> int:
        """Stored bytes of rows [start, end) of dim 0 (a scalar: all of it)."""
        return (end - start) * (self.nbytes // self.rows if self.rows else 0) if self.shape else self.nbytes


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict, bytes]:
    """Parse and check one safetensors header: (tensors, __metadata__, raw header bytes).

    Detects truncated files (tensor data past the end of the file) and corrupt headers, naming the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file "
                                      f"(header length {n}, file size {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype, shape, (begin, end) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
            if not all(type(x) is int and x >= 0 for x in (*shape, begin, end)) or end < begin:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r} (needs a dtype, a "
                                  f"shape and data_offsets of non-negative integers): {h!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, path, data_start + int(begin), int(end) - int(begin))
        itemsize = SAFETENSORS_DTYPES[dtype][0]
        if info.nbytes != info.numel * itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name!r} has {info.nbytes} bytes for shape "
                f"{list(shape)} {dtype}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data section but the file holds "
                f"only {data_size} bytes of data"
            )
        tensors[name] = info
    return tensors, meta, raw


def read_model_config(model_dir: Path) -> dict:
    """A model directory's config.json as a dict ({} when there is none); CheckpointError when it is not a JSON
    object."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.exists():
        return {}
    try:
        config = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg}: must hold a JSON object (a model config), got {type(config).__name__}")
    return config


def _read_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done} "
                                  "(file truncated while reading?)")
        done += n


class Checkpoint:
    """A Hugging Face model directory opened lazily.

    `tensors` maps each name to its TensorInfo, in file order (shard, then offset) so reads are sequential.
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        self._fds: dict[Path, int] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self.config = self._read_config()
        self.files, self.tensors, self.header_bytes = self._open_weights(allow_pickle)

    @property
    def is_pickle(self) -> bool:
        """Whether the weights came from pickle files (held in memory: nothing to map)."""
        return bool(self._pickled)

    # -- discovery ------------------------------------------------------------------------------------------
    def _read_config(self) -> dict:
        return read_model_config(self.path)

    def _open_weights(self, allow_pickle: bool):
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model directory does not exist")
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files, got "
                                      f"{type(weight_map).__name__}")
            for name, f in weight_map.items():
                # a shard is a file of this directory: a path elsewhere would merge another model's bytes
                if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
                    raise CheckpointError(f"{index}: maps tensor {name!r} to {f!r}, which is not a file name in "
                                          f"{self.path}")
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist in {self.path}")
        elif single.exists():
            weight_map, files = None, [single]
        else:
            other = sorted(self.path.glob("*.safetensors"))
            pickles = sorted(p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if other:
                weight_map, files = None, other
            elif pickles:
                return self._open_pickles(pickles, allow_pickle)
            else:
                raise CheckpointError(f"{self.path}: no model.safetensors, model.safetensors.index.json or "
                                      "*.safetensors found")
        tensors: dict[str, TensorInfo] = {}
        headers: dict[str, bytes] = {}
        for f in files:
            found, _, raw = read_safetensors_header(f)
            headers[f.name] = raw
            for name, info in found.items():
                if name in tensors:
                    raise CheckpointError(f"{f}: tensor {name!r} also stored in {tensors[name].file.name}")
                tensors[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in tensors or tensors[name].file.name != fname:
                    raise CheckpointError(f"{index}: maps tensor {name!r} to {fname}, "
                                          "but that shard does not contain it")
        order = sorted(tensors.values(), key=lambda t: (t.file.name, t.offset))
        return files, {t.name: t for t in order}, headers

    def _open_pickles(self, files: list[Path], allow_pickle: bool):
        if not allow_pickle:
            raise CheckpointError(
                f"{self.path}: holds only pickle checkpoints ({', '.join(f.name for f in files)}); pickle can run "
                "arbitrary code, so it is not loaded by default. Convert to safetensors, or set allow_pickle: true "
                "(loaded with torch.load(weights_only=True))."
            )
        import torch

        tensors: dict[str, TensorInfo] = {}
        headers: dict[str, bytes] = {}
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
                raise CheckpointError(f"{f}: cannot load with torch.load(weights_only=True): {e}") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: holds a {type(sd).__name__}, not a state dict (tensor names to tensors)")
            with open(f, "rb") as fh:
                headers[f.name] = fh.read(65536)
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    continue
                t = t.contiguous()
                self._pickled[name] = t
                tensors[name] = TensorInfo(name, safetensors_dtype(t.dtype), tuple(t.shape), f, -1,
                                           t.numel() * t.element_size())
        return files, tensors, headers

    # -- reads ----------------------------------------------------------------------------------------------
    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _check_rows(self, name: str, start: int, end: int) -> TensorInfo:
        info = self.tensors[name]
        if not 0 <= start <= end <= info.rows:
            # Out-of-range rows would silently read the bytes of the next tensor in the file.
            raise IndexError(f"{info.file}: rows [{start}, {end}) out of range for tensor {name!r} "
                             f"with {info.rows} rows")
        return info

    def read_bytes(self, name: str, start: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """The stored bytes of rows [start, end) of dim 0 (a scalar: all of it) as a flat uint8 array, read with
        `preadv`: only those bytes. `out`: a reusable uint8 buffer of at least that size to read into (the result is
        a view of it); a fresh one otherwise. Reusing one avoids faulting in new pages for every tile."""
        info = self._check_rows(name, start, end)
        if name in self._pickled:
            import torch

            t = self._pickled[name]
            return (t[start:end] if info.shape else t).contiguous().reshape(-1).view(torch.uint8).numpy().copy()
        nbytes = info.rows_nbytes(start, end)
        buf = out[:nbytes] if out is not None and out.size >= nbytes else np.empty(nbytes, np.uint8)
        if nbytes:
            _read_into(self._fd(info.file), memoryview(buf), info.offset + info.rows_nbytes(0, start), info.file)
        return buf

    def row_bytes(self, name: str, start: int, end: int, mapped: bool, out: np.ndarray | None = None) -> np.ndarray:
        """The stored bytes of rows [start, end): mapped from the page cache (`map_bytes`) or read (`read_bytes`,
        into `out`). Pickled tensors, which live in memory, and empty ranges are read."""
        if mapped and name not in self._pickled and self._check_rows(name, start, end).rows_nbytes(start, end):
            return self.map_bytes(name, start, end)
        return self.read_bytes(name, start, end, out)

    def read_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of dim 0 as a tensor in the stored dtype (`read_bytes`)."""
        return as_tensor(self.tensors[name], start, end, self.read_bytes(name, start, end))

    def map_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """`read_rows` without the copy (`row_bytes` mapped)."""
        return as_tensor(self.tensors[name], start, end, self.row_bytes(name, start, end, mapped=True))

    def map_bytes(self, name: str, start: int, end: int) -> np.ndarray:
        """The stored bytes of rows [start, end) as a flat, writable uint8 array, mapped from the page cache and
        faulted in here, on the calling thread (so a reader thread pays for it, not the kernels that use them).
        Several times cheaper than `preadv` on cached files: no copy, and no private memory to fault in. The mapping
        is private (copy on write), so writing into the array never touches the file; it is unmapped when the last
        view of it goes. Safetensors data only: a pickled tensor has no bytes to map.

        A file truncated after this returns makes the next access to the lost pages a SIGBUS, not an exception:
        `read_bytes` is the safer choice for inputs that may change during a merge."""
        info = self._check_rows(name, start, end)
        if name in self._pickled:
            raise CheckpointError(f"{info.file}: tensor {name!r} comes from a pickle checkpoint and cannot be mapped")
        nbytes = info.rows_nbytes(start, end)
        if nbytes == 0:
            return np.empty(0, np.uint8)
        begin = info.offset + info.rows_nbytes(0, start)
        skip = begin % mmap.ALLOCATIONGRANULARITY  # mappings start on a page boundary
        try:
            mm = mmap.mmap(self._fd(info.file), skip + nbytes, access=mmap.ACCESS_COPY, offset=begin - skip)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{info.file}: cannot map bytes {begin}-{begin + nbytes} of tensor {name!r}: {e} "
                                  "(file truncated while reading?)") from None
        whole = np.frombuffer(mm, np.uint8)  # from the mapping's page-aligned start
        # one readahead for the whole range if it is not cached, then wait for every page
        err = _madvise(whole, mmap.MADV_WILLNEED) or _madvise(whole, MADV_POPULATE_READ)
        if err == errno.EFAULT:  # pages past the end of the file
            del whole  # the mapping cannot close while an array views it
            mm.close()
            raise CheckpointError(f"{info.file}: unexpected end of file reading tensor {name!r} "
                                  f"(bytes {begin}-{begin + nbytes}; file truncated while reading?)")
        if err:
            whole[::mmap.PAGESIZE].max()  # older kernels (no MADV_POPULATE_READ): touch every page instead
        return whole[skip:skip + nbytes]

    def read(self, name: str) -> torch.Tensor:
        """A whole tensor (`read_rows`)."""
        return self.read_rows(name, 0, self.tensors[name].rows)

    def fingerprint(self) -> dict:
        """Cheap identity of the inputs: each weight file's size and the sha256 of its header bytes."""
        return {
            f.name: {"size": f.stat().st_size, "header_sha256": hashlib.sha256(self.header_bytes[f.name]).hexdigest()}
            for f in self.files
        }

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def as_tensor(info: TensorInfo, start: int, end: int, raw: np.ndarray) -> torch.Tensor:
    """Rows [start, end) of a tensor as a torch tensor of its stored dtype and shape, viewing their stored bytes
    `raw` (no copy)."""
    import torch

    shape = (end - start,) + info.shape[1:] if info.shape else ()
    if raw.size == 0:  # numpy gives an empty array stride 0, which torch cannot view as another dtype
        return torch.empty(shape, dtype=info.torch_dtype)
    return torch.from_numpy(raw).view(info.torch_dtype).reshape(shape)


def stored_float_dtype(spec: str | Path) -> str | None:
    """The dtype code of the first floating tensor of a local model directory, from one shard's header; None when
    that is not cheap to know (a hub id, pickles, anything unreadable: validation reports those properly). A hint
    (which compiled kernels a merge actor loads while the driver validates), never an input to the math."""
    p = Path(spec).expanduser()
    try:
        index = p / "model.safetensors.index.json"
        if index.is_file():
            first = p / min(json.loads(index.read_text())["weight_map"].values())
        else:
            first = min(p.glob("*.safetensors"))
        tensors, _, _ = read_safetensors_header(first)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # ValueError: also min() of nothing
        return None
    return next((t.dtype for t in tensors.values() if t.is_float), None)
