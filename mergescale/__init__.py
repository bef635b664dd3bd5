"""mergescale: fine-tune expert LLMs, merge them exactly at scale, evaluate the merges.

Python API (mergescale/api.py): `mergescale.merge(config, out, workers=K)`, `mergescale.eval.evaluate(...)`,
`mergescale.training.train(...)`; one config schema in mergescale.config.
"""

import types

from mergescale import merge
from mergescale.config import MergeConfig, load_config

__version__ = "0.1.0"
__all__ = ["MergeConfig", "load_config", "merge", "__version__"]


class _CallableMergePackage(types.ModuleType):
    """`mergescale.merge` is the merge subpackage and the API's merge function at once: a plain function named merge
    here would be replaced by the subpackage as soon as anything imports one of its modules."""

    def __call__(self, *args, **kwargs):
        from mergescale.api import merge as run

        return run(*args, **kwargs)


merge.__class__ = _CallableMergePackage
