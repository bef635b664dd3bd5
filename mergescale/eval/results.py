"""Results on disk: the content-addressed score cache, per-example rows and per-task metrics (Parquet).

Layout of an output directory:
    cache/part-<hash>.parquet   one file per finished chunk of work; rows keyed by
                                sha256(model fingerprint, task, template, example id, input hash, choice)
    examples/<task>.parquet     per-example rows of the latest run (rewritten when the task completes)
    metrics.parquet, metrics.json   per-task metrics, rewritten after each task completes
Every file is written to a temporary name in the same directory, then renamed (atomic on POSIX), so a
crash never leaves a half-written file and a rerun (any number of replicas) skips every cached key.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CACHE_SCHEMA = pa.schema([
    ("key", pa.string()), ("model_fingerprint", pa.string()), ("task", pa.string()), ("template", pa.string()),
    ("example_id", pa.string()), ("choice", pa.int32()), ("logprob", pa.float64()), ("n_tokens", pa.int32()),
    ("generation", pa.string()),
])
GENERATE = -1  # `choice` value of a generation row


def sha256(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model_dir: str | Path, extra: dict | None = None, weights: str | None = None) -> str:
    """Weights (file sizes + safetensors header hashes, via mergescale.checkpoint.read; or `weights`, a pushed
    merge's fingerprint, for a model held in memory), config.json, the tokenizer files and the scoring settings
    (`extra`, e.g. max_length) hashed together."""
    from mergescale.checkpoint.read import Checkpoint

    model_dir = Path(model_dir)
    if weights is not None:
        weights = ["pushed", weights]
    else:
        with Checkpoint(model_dir) as ck:
            weights = ck.fingerprint()
    files = {}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                 "special_tokens_map.json"):
        p = model_dir / name
        if p.exists():
            files[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return sha256(weights, files, extra or {})[:24]


def cache_key(model_fp: str, task: str, template: str, example_id: str, input_text: str, choice: str) -> str:
    return sha256(model_fp, task, template, example_id, hashlib.sha256(input_text.encode()).hexdigest(), choice)


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_json_atomic(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)
    return path


class ScoreCache:
    """In-memory view of out/cache/*.parquet for one model; `add` persists a chunk's rows as a new part."""

    def __init__(self, out_dir: Path | None, model_fp: str):
        self.dir = Path(out_dir) / "cache" if out_dir is not None else None
        self.model_fp = model_fp
        self.rows: dict[str, dict] = {}
        if self.dir is not None and self.dir.exists():
            for part in sorted(self.dir.glob("part-*.parquet")):
                t = pq.read_table(part, filters=[("model_fingerprint", "=", model_fp)])
                for r in t.to_pylist():
                    self.rows[r["key"]] = r

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> dict:
        return self.rows[key]

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            r["model_fingerprint"] = self.model_fp
            self.rows[r["key"]] = r
        if self.dir is not None and rows:
            table = pa.Table.from_pylist(rows, schema=CACHE_SCHEMA)
            write_parquet_atomic(table, self.dir / f"part-{sha256([r['key'] for r in rows])[:20]}.parquet")
