"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest

from mergescale.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tbase") / "base", seed=0)
