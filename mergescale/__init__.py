"""mergescale: fine-tune expert LLMs, merge them exactly at scale, evaluate the merges.

Python API: `mergescale.merge(config, out, workers=K)` (see mergescale/merge/__init__.py),
`mergescale.eval.evaluate(...)`, `mergescale.training.train(...)`; one config schema in mergescale.config.
"""

__version__ = "0.1.0"

from mergescale import merge  # noqa: E402  - the subpackage, callable as the merge function
from mergescale.config import MergeConfig, load_config  # noqa: E402

__all__ = ["MergeConfig", "load_config", "merge", "__version__"]
