"""mergescale: fine-tune expert LLMs, merge them exactly at scale, evaluate the merges."""

__version__ = "0.1.0"

from mergescale.config import MergeConfig, load_config  # noqa: E402


def merge(config, out=None, *, workers=None, address=None, overwrite=False, progress=True):
    """Merge the experts described by `config` (a MergeConfig, a dict or a YAML path) into `out`.

    With `workers=None` the single-process streaming executor runs; with `workers=K` the merge is
    spread over K Ray actors (embedded local Ray unless `address` is given). Returns the manifest dict.
    """
    if workers is None:
        from mergescale.merge.executor import run_merge

        return run_merge(load_config(config), out, overwrite=overwrite, progress=progress)
    from mergescale.cluster.merge import run_distributed_merge

    return run_distributed_merge(
        load_config(config), out, workers=workers, address=address, overwrite=overwrite, progress=progress
    )


__all__ = ["MergeConfig", "load_config", "merge", "__version__"]
