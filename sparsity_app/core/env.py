"""The process's environment, set in one place: every entry point (CLI, app, job worker, Python API)
calls `configure()` before anything reads it. Values already set by the operator are kept.
"""
from __future__ import annotations

import os

from sparsity_app.core.requests import default_threads


def configure() -> None:
    """Set what TVM, PyTorch and Hugging Face read from the environment (idempotent).

    - TVM_NUM_THREADS: TVM sizes its thread pool once, from this variable, when the first parallel
      kernel runs; without it the pool has one thread on these machines. Per-run thread counts are
      set by kernels.set_threads.
    - TVM_THREAD_POOL_SPIN_COUNT: after a call TVM's idle workers spin before they sleep (default
      ~300k yields, a long time); while they spin they steal the cores PyTorch's OpenMP threads need,
      which made PyTorch dense read 20x slower when the two were timed alternately. 1000 keeps
      back-to-back TVM calls at full speed.
    - HF_HUB_OFFLINE: weights come from a pip package; never reach a hub (read when transformers
      is imported).
    - TRANSFORMERS_VERBOSITY: warnings about unused checkpoint weights are noise here.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(default_threads()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
