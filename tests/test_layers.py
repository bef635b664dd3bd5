"""The package's arrows point one way, and the lint configured in pyproject.toml stays clean.

- Ray is imported only under mergescale/cluster/ (at module level or inside a function).
- merge/, eval/, training/, checkpoint/ and data/ never import mergescale.cluster: the top layer (mergescale.api,
  the command lines, the study) hands runners down.
- checkpoint/ (the one checkpoint I/O) imports none of merge, eval, training or study.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PKG = REPO / "mergescale"


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names (relative imports resolved)."""
    names = set()
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def sources(under: str) -> list[Path]:
    return sorted((PKG / under).rglob("*.py"))


def offenders(under: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(REPO)} imports {m}" for p in sources(under) for m in sorted(imported_modules(p))
            if any(m == f or m.startswith(f + ".") for f in forbidden)]


def test_the_import_scanner_sees_function_level_and_relative_imports(tmp_path):
    # the scanner itself: a lazy import inside a function and a relative import count
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import ray\n    from ..cluster import merge\n")
    assert {"ray", "mergescale.cluster", "mergescale.cluster.merge"} <= imported_modules(probe, "mergescale.merge")


def test_ray_is_imported_only_under_cluster():
    found = [o for d in sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name not in ("cluster",
                                                                                             "__pycache__"))
             for o in offenders(d, ("ray",))]
    found += [f"{p.name} imports ray" for p in PKG.glob("*.py") if any(
        m == "ray" or m.startswith("ray.") for m in imported_modules(p))]
    assert found == []


@pytest.mark.parametrize("layer", ["merge", "eval", "training", "checkpoint", "data", "models"])
def test_lower_layers_never_import_cluster(layer):
    assert offenders(layer, ("mergescale.cluster",)) == []


def test_checkpoint_io_imports_no_layer_above_it():
    above = ("mergescale.merge", "mergescale.eval", "mergescale.training", "mergescale.study", "mergescale.api")
    assert offenders("checkpoint", above) == []


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None,
                    reason="ruff is installed by scripts/setup.sh (the dev extra)")
def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    done = subprocess.run([ruff, "check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:]
