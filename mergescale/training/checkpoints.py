"""The DeepSpeed checkpoints of a run: names, rotation, and the seal that makes resume load only what we wrote.

DeepSpeed loads its checkpoint files with torch.load(weights_only=False), which runs any code a pickle holds. So
after every rank has saved, the files of the checkpoint are hashed (each rank hashes a share) and rank 0 writes
SEAL into the checkpoint directory: the data fingerprint and each file's size and sha256. A resume considers only
sealed checkpoints and verifies every file against the seal before DeepSpeed opens one; a checkpoint whose save was
cut short has no seal and is passed over. Anyone who can write the checkpoint directory could still forge a seal:
keep it as private as the code you run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

SEAL = "mergescale-checkpoint.json"
_CHUNK = 1 << 22


class CheckpointMismatch(ValueError):
    """A sealed checkpoint whose files are not the ones recorded when mergescale saved it, or of other data."""


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(root: Path) -> list[Path]:
    """step_* directories under root, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def rotate_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` step_* directories (rank 0, after every rank finished saving)."""
    for old in step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_files(directory: Path) -> list[str]:
    """The files of a checkpoint directory (relative paths, sorted), the seal excepted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != SEAL)


def file_digests(directory: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "sha256"}} of files under directory."""
    out = {}
    for name in names:
        h = hashlib.sha256()
        with open(directory / name, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        out[name] = {"size": (directory / name).stat().st_size, "sha256": h.hexdigest()}
    return out


def seal(directory: Path, fingerprint: str, digests: dict[str, dict]) -> None:
    """Write the seal atomically (temporary file, fsync, rename)."""
    tmp = directory / f".{SEAL}.tmp"
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "files": digests}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / SEAL)


def newest_sealed(root: Path) -> tuple[str, dict] | None:
    """(tag, seal) of the newest sealed checkpoint under root; None when there is none."""
    for d in reversed(step_dirs(root)):
        if (d / SEAL).is_file():
            try:
                return d.name, json.loads((d / SEAL).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointMismatch(f"{d / SEAL}: unreadable seal ({e}); remove {d} or train with "
                                         "--no-resume") from None
    return None


def check_listing(directory: Path, recorded: dict, fingerprint: str) -> list[str]:
    """The files to hash, after the cheap checks (data fingerprint, names, sizes); CheckpointMismatch otherwise."""
    where = f"checkpoint {directory}"
    if recorded.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(f"{where} was made with other training data; remove it or train with --no-resume")
    files = recorded.get("files")
    if not isinstance(files, dict):
        raise CheckpointMismatch(f"{where}: its seal {SEAL} lists no files")
    names = checkpoint_files(directory)
    extra, missing = sorted(set(names) - set(files)), sorted(set(files) - set(names))
    if extra or missing:
        raise CheckpointMismatch(f"{where} differs from what mergescale saved: "
                                 + "; ".join(x for x in (extra and f"files added: {', '.join(extra)}",
                                                         missing and f"files missing: {', '.join(missing)}") if x))
    for name in names:
        size = (directory / name).stat().st_size
        if size != files[name].get("size"):
            raise CheckpointMismatch(f"{directory / name}: {size} bytes, but {files[name].get('size')} when mergescale "
                                     "saved it")
    return names


def check_digests(directory: Path, recorded: dict, digests: dict[str, dict]) -> None:
    for name, d in sorted(digests.items()):
        if d["sha256"] != recorded["files"][name].get("sha256"):
            raise CheckpointMismatch(f"{directory / name}: sha256 {d['sha256'][:16]}... differs from the one "
                                     "mergescale recorded when it saved the checkpoint; the file was changed, so it "
                                     "is not loaded (torch.load of it could run code). Remove the checkpoint "
                                     "directory or train with --no-resume")


def verified_resume_tag(root: Path, fingerprint: str) -> str | None:
    """The tag of the newest sealed checkpoint, every file verified (one process hashes them all); None when
    there is none. CheckpointMismatch when one differs from its seal."""
    found = newest_sealed(root)
    if found is None:
        return None
    tag, recorded = found
    names = check_listing(root / tag, recorded, fingerprint)
    check_digests(root / tag, recorded, file_digests(root / tag, names))
    return tag
