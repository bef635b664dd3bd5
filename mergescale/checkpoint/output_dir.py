"""The output location, checked before anything is written: what a directory must hold for `--overwrite` to replace
it, and whether its file system has room for what the merge still has to write. No torch.

The merge (single process and Ray driver) and the trainer's model writer share these checks, so no command deletes
a directory that it did not write, and none fails halfway through for lack of space it could have seen coming.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from mergescale.errors import MergeInputError, NoSpaceError

MANIFEST = "mergescale_manifest.json"
INDEX = "model.safetensors.index.json"
# Files copied into an output from the model that gives its config and tokenizer
METADATA_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# What an output written before its manifest listed its files may hold besides its shards (the trainer adds
# metrics.jsonl)
_KNOWN_FILES = {MANIFEST, INDEX, "metrics.jsonl", *METADATA_FILES}
SHOW = 5  # how many names a message lists
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def partial_dir(out: Path) -> Path:
    """The hidden sibling directory an output is written into before its atomic rename."""
    return out.parent / f".{out.name}.partial"


def _names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:SHOW]) + (f" and {len(names) - SHOW} more" if len(names) > SHOW else "")


def replace_refusal(out: Path) -> str | None:
    """Why `--overwrite` must not replace `out`, or None when it may: it does not exist, is an empty directory, or
    is a complete mergescale output. Complete means its manifest lists its shards, each is there at its recorded
    size, and nothing else is in it but files the manifest lists (or, for outputs whose manifest predates that
    list, the index and metadata files an output holds): a file a person added would be deleted with it."""
    if out.is_symlink():
        return f"{out} is a symbolic link (replacing it would not replace what it points to)"
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} exists and is not a directory"
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return None
    if MANIFEST not in entries:
        return f"{out} is not a mergescale output (no {MANIFEST}); it holds {_names(entries)}"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{out / MANIFEST} is not a readable manifest ({e})"
    outputs = manifest.get("outputs") if isinstance(manifest, dict) else None
    if not isinstance(outputs, dict) or not outputs:
        return f"{out / MANIFEST} lists no output shards: {out} is not a complete mergescale output"
    for name, entry in outputs.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        f = out / name
        have = f.stat().st_size if f.is_file() else None
        if have is None or have != size:
            return (f"{out} is not a complete mergescale output: its manifest lists {name} of {size} bytes, "
                    f"which is {'missing' if have is None else f'{have} bytes'}")
    listed = manifest.get("files")
    known = set(listed) | {MANIFEST} if isinstance(listed, list) else _KNOWN_FILES | set(outputs)
    extra = entries - known
    if extra:
        return f"{out} holds files its manifest does not list, which replacing it would delete: {_names(extra)}"
    return None


def existing_ancestor(path: Path) -> Path:
    """`path` or its nearest ancestor that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(out: Path, overwrite: bool, inputs: list[Path] = ()) -> None:
    """The output location is free (or, with overwrite, replaceable), is not an input, and can be created."""
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MergeInputError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    target = out.resolve()
    for p in inputs:  # --overwrite would delete an input model (the commit replaces the whole directory)
        p = Path(p).resolve()
        if p == target or target in p.parents:
            raise MergeInputError(f"output directory {out} holds the input model {p}; choose another --out")
    refusal = replace_refusal(out)
    if refusal is not None:
        raise MergeInputError(f"--overwrite will not replace {out}: {refusal}. Move it away or choose another --out")
    parent = existing_ancestor(out.parent)
    if not parent.is_dir():
        raise MergeInputError(f"output directory {out} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeInputError(f"output directory {out} cannot be created: no permission to write in {parent}")
    work = partial_dir(out)
    if work.exists() and not (work / "run.json").is_file() and any(work.iterdir()):
        held = _names(p.name for p in work.iterdir())
        raise MergeInputError(f"{work} (where the output of {out} is written before it is moved into place) exists "
                              f"and was not written by mergescale (no run.json); it holds {held}. Move it away")


# ------------------------------------------------------------------------------------------------------------
# Space


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (or where it would be created)."""
    p = existing_ancestor(path).resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def held_bytes(files) -> int:
    """Bytes already allocated to these files (a resumed output's shards are sparse: only written rows take space)."""
    total = 0
    for f in files:
        try:
            total += f.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def partial_run_key(out: Path) -> str | None:
    """The run key recorded in the partial output of `out` (PartialOutput.open), if there is a readable one."""
    try:
        marker = json.loads((partial_dir(out) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return marker.get("run_key") if isinstance(marker, dict) else None


def room(out: Path, shard_names: list[str], shard_sizes: list[int], extra: int, run_key: str) -> tuple[int, int]:
    """(bytes the output still has to take on its file system, bytes free there). Needed: every shard's size, less
    what a partial output of this run (same run key: it is resumed) already holds, plus `extra` (metadata,
    journal, manifest). Free: what the file system has, plus what a partial output of another run holds (it is
    removed before anything is written)."""
    work = partial_dir(out)
    needed = sum(shard_sizes) + extra
    free = free_bytes(out.parent)
    if work.is_dir():
        if partial_run_key(out) == run_key:
            needed = max(extra, needed - held_bytes(work / n for n in shard_names))
        else:
            free += held_bytes(p for p in work.iterdir() if p.is_file())
    return needed, free


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of `path`."""
    return shutil.disk_usage(existing_ancestor(path)).free


def space_error(out: Path, needed: int, free: int, during: str | None = None) -> NoSpaceError:
    where = f"the file system mounted at {mount_point(out)}"
    if during is None:
        return NoSpaceError(f"not enough space for {out} on {where}: the merge has {human_bytes(needed)} "
                            f"({needed} bytes) to write and {human_bytes(free)} ({free} bytes) is free. Free some "
                            "space or choose another --out")
    return NoSpaceError(f"no space left on {where} while {during}: the merge still needs {human_bytes(needed)} "
                        f"({needed} bytes) there and {human_bytes(free)} is free. Free some space and rerun the same "
                        f"command to resume (finished units are kept in {partial_dir(out)}), or delete that "
                        "directory to give up")


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


def human_bytes(n: float) -> str:
    """A byte count for people: decimal units, one decimal."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
