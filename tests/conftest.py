import os

import pytest
from hypothesis import settings

# Numeric properties: no deadline (a TVM compile takes ~0.1 s), few examples (each compiles).
settings.register_profile("default", deadline=None, max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private, empty result cache for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("SPARSITY_APP_CACHE_DIR", str(d))
    return d
