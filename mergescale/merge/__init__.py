"""Checkpoint I/O, merge methods (pure tensor functions) and the streaming merge executor.

This package is also the Python API's merge function: `mergescale.merge(config, out, workers=K)`. A module
that is callable keeps both `mergescale.merge(...)` and `import mergescale.merge.executor` working (a plain
function named `merge` in the top package would shadow this subpackage).
"""

import sys
import types


def merge(config, out=None, *, workers=None, address=None, overwrite=False, progress=True, resume=True):
    """Merge the experts described by `config` (a MergeConfig, a dict or a YAML path) into `out`.

    With `workers=None` the single-process streaming executor runs; with `workers=K` the merge is spread over
    K Ray actors (embedded local Ray unless `address` is given or Ray is already initialized). Blocks and
    returns the manifest dict. For a non-blocking form inside a Ray program see
    `mergescale.cluster.merge.merge_async`.
    """
    if workers is None and address is None:
        from mergescale.merge.executor import run_merge

        return run_merge(config, out, overwrite=overwrite, progress=progress, resume=resume)
    from mergescale.cluster.merge import run_distributed_merge

    return run_distributed_merge(config, out, workers=workers, address=address, overwrite=overwrite,
                                 progress=progress, resume=resume)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
