"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import pytest

from mergescale.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer big enough for the fixture tasks' text."""
    return build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", seed=0, vocab_size=384)
