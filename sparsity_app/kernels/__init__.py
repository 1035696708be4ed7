"""TVM kernels for Y = X @ W^T on the host CPU, and the machinery they share.

X is float32 [tokens, in] row-major; Y is float32 [tokens, out]; W is [out, in] as in nn.Linear.
Each kernel family lives in its own module (dense.py, bsr.py) with its compute written as a
TVMScript function whose schedule knobs are plain Python arguments.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Callable

import numpy as np
import torch
import tvm

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import default_threads


@functools.cache
def host_target() -> "tvm.target.Target":
    """LLVM target for this CPU: its own mcpu (e.g. znver4), so LLVM uses every ISA extension."""
    return tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": default_threads()})


@functools.cache
def host_mcpu() -> str:
    return str(tvm.target.codegen.llvm_get_system_cpu())


def max_threads() -> int:
    """The size of TVM's thread pool (core.env.configure sets it before the first kernel runs)."""
    return int(os.environ.get("TVM_NUM_THREADS", default_threads()))


def set_threads(n: int) -> None:
    """Use n threads in TVM kernels and in PyTorch from now on (same count for every implementation)."""
    if not 1 <= n <= max_threads():
        raise UserError(f"threads must be between 1 and {max_threads()} on this machine, got {n}")
    tvm.get_global_func("runtime.config_threadpool")(1, n)
    torch.set_num_threads(n)


def tir_builder(builder: Callable) -> Callable:
    """Decorator for a function of hashable arguments that returns a TVMScript PrimFunc: the PrimFunc
    is parsed on a short stack, and kept per arguments (a PrimFunc is immutable).

    TVMScript's `@T.prim_func` and `@T.macro` walk the caller's whole stack (`inspect.stack`), and
    each frame without a source file on disk (`<frozen runpy>` under `python -m`) costs a scan of
    every loaded module (about 3,700 with torch and transformers). Under the CLI a BSR PrimFunc took
    about 115 ms to parse against 50 ms on a short stack, about 15 s of a whole-model compile.
    A fresh thread's stack holds only the builder's own frames.
    """
    @functools.lru_cache(maxsize=1024, typed=True)  # 1 and 1.0 build different dtypes
    def cached(*args, **kwargs):
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tvmscript") as fresh:
            return fresh.submit(builder, *args, **kwargs).result()  # its error, if any, raised here

    return functools.wraps(builder)(cached)


def compile_prim_func(func: "tvm.tirx.PrimFunc", name: str):
    """Compile one PrimFunc for the host; returns the callable (takes tvm tensors or torch tensors)."""
    ex = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=host_target())
    return ex[name]


@dataclasses.dataclass(frozen=True)
class KernelSource:
    """What a kernel is compiled from: `builder(*args)` -> PrimFunc, exported as `symbol`.

    Hashable, so one compile per (builder, args, target) is kept; the same source compiles for the
    host here or for a remote device's target (remote.py).
    """

    symbol: str  # the function's name in the compiled module
    builder: Callable  # (*args) -> tvm.tirx.PrimFunc
    args: tuple  # shapes, knobs and counts the PrimFunc is specialised for (all hashable)

    def prim_func(self, symbol: str | None = None) -> "tvm.tirx.PrimFunc":
        return self.builder(*self.args).with_attr("global_symbol", symbol or self.symbol)


@functools.lru_cache(maxsize=256)
def compile_source(source: KernelSource):
    """The source compiled for the host: a callable taking tvm or torch tensors."""
    return compile_prim_func(source.builder(*source.args), source.symbol)


def tensor(array: np.ndarray) -> "tvm.runtime.Tensor":
    return tvm.runtime.tensor(np.ascontiguousarray(array), tvm.cpu())


def empty(shape: tuple[int, ...]) -> "tvm.runtime.Tensor":
    return tvm.runtime.empty(shape, "float32", tvm.cpu())


def largest_divisor(n: int, at_most: int) -> int:
    """Largest d <= at_most with n % d == 0 (tiles must divide their loop; 1 always does)."""
    return next(d for d in range(min(n, at_most), 0, -1) if n % d == 0)


def balanced_parts(indptr: np.ndarray, n_parts: int) -> np.ndarray:
    """Row bounds int32 [n_parts + 1] cutting rows into contiguous runs of about equal work.

    indptr: int32 [rows + 1] (CSR/BSR row pointers); a row's work is its stored entries plus one
    (for its stores). Rows of a pruned weight keep unequal counts, so a static split by row number
    leaves one thread waiting for the other.
    """
    work = np.diff(indptr).astype(np.int64) + 1
    cum = np.concatenate([[0], np.cumsum(work)])
    cuts = np.searchsorted(cum, np.arange(1, n_parts) * cum[-1] / n_parts)
    return np.concatenate([[0], cuts, [len(work)]]).astype(np.int32)


class Kernel:
    """A kernel bound to its arguments: Y = X @ W^T for one weight and one X.

    Subclasses set `source` (KernelSource: what to compile), `_args` (its tvm tensors on this
    machine, output last) and `_feature_major` (True when the output is Y^T [out, tokens]). The
    host compile happens on first use (`compile()`), so a kernel meant for a remote device is never
    compiled for this one. `run()` reuses the preallocated buffers, for timing; `output()` returns
    Y float32 [tokens, out] whatever the layout.
    """

    source: KernelSource
    _args: tuple = ()
    _feature_major = False

    @functools.cached_property
    def _fn(self):
        return compile_source(self.source)

    def compile(self) -> "Kernel":
        """Compile for the host now (else on the first run); returns self."""
        self._fn
        return self

    def arrays(self) -> list[np.ndarray]:
        """The arguments as NumPy arrays, output buffer last (what a remote device is sent)."""
        return [a.numpy() for a in self._args]

    def to_output(self, y: np.ndarray) -> np.ndarray:
        """The output buffer's contents as Y float32 [tokens, out]."""
        return np.ascontiguousarray(y.T) if self._feature_major else y

    def run(self) -> None:
        self._fn(*self._args)

    def output(self) -> np.ndarray:
        self.run()
        return self.to_output(self._args[-1].numpy())
