"""The layout of a merged model's output, planned before any math runs: which shard each tensor goes to, its byte
offset, and every shard's safetensors header. No torch, no I/O (mergescale.checkpoint.write writes it)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mergescale.checkpoint.read import SAFETENSORS_DTYPES


@dataclass
class OutTensor:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


@dataclass
class OutputLayout:
    shard_names: list[str]
    shard_sizes: list[int]
    headers: list[bytes]
    tensors: dict[str, OutTensor]

    @classmethod
    def plan(cls, specs: list[tuple[str, str, tuple[int, ...]]], max_shard_size: int) -> "OutputLayout":
        """Greedy in input order: a shard takes tensors until the next would pass max_shard_size."""
        groups: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in specs:
            n = 1
            for s in shape:
                n *= s
            nbytes = n * SAFETENSORS_DTYPES[dtype][0]
            if groups[-1] and size + nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        k = len(groups)
        names = ["model.safetensors"] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        tensors, headers, sizes = {}, [], []
        for shard, group in enumerate(groups):
            header: dict = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name, dtype, shape, nbytes in group:
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
            data_start = 8 + len(raw)
            for name, dtype, shape, nbytes in group:
                begin = header[name]["data_offsets"][0]
                tensors[name] = OutTensor(name, dtype, shape, shard, data_start + begin, nbytes)
            headers.append(len(raw).to_bytes(8, "little") + raw)
            sizes.append(data_start + pos)
        return cls(names, sizes, headers, tensors)

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, raw in zip(self.shard_names, self.headers):
            h.update(name.encode())
            h.update(raw)
        return h.hexdigest()
