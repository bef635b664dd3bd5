"""Real models offline: GGUF files (alone, or shipped inside pip packages) imported as Hugging Face directories."""

from mergescale.models.gguf_import import ModelImportError, import_gguf, sanity_check
from mergescale.models.sources import SMOLLM2, package_gguf, resolve_model

__all__ = ["ModelImportError", "import_gguf", "sanity_check", "SMOLLM2", "package_gguf", "resolve_model"]
