import os
import subprocess
import sys

import pytest
from hypothesis import settings

from sparsity_app.core import env

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # Several workers share the cores, and no test asserts a speed: a thread pool that spins while it
    # waits (PyTorch's OpenMP, TVM's) burns the core another worker needs. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
env.configure()  # as every entry point does (threads, TVM pool, offline Hugging Face)

# Numeric properties: no deadline (a TVM compile takes ~0.1 s), few examples (each compiles).
settings.register_profile("default", deadline=None, max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    """A private measurement slot per test (the real one is machine-wide), shared with its subprocesses."""
    d = tmp_path / "measure-slot"
    monkeypatch.setenv("SPARSITY_APP_LOCK_DIR", str(d))
    return d


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private, empty result cache for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("SPARSITY_APP_CACHE_DIR", str(d))
    return d


@pytest.fixture
def cli(cache_dir):
    """Run `python -m sparsity_app ARGS` in a subprocess on the test's private cache."""
    def run(args, timeout=900):
        env = {**os.environ, "SPARSITY_APP_CACHE_DIR": str(cache_dir)}
        return subprocess.run([sys.executable, "-m", "sparsity_app", *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
    return run
