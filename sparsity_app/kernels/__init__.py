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


@dataclasses.dataclass(frozen=True)
class VectorISA:
    """What the host's vector unit offers a kernel's register tile (its knobs are chosen from this).

    A schedule written for one width spills on the other: the dense GEMM's AVX-512 tile (8 tokens x
    32 outputs, 16 accumulators of 32) needs 32 AVX2 registers of 16 and ran at 34 GFLOP/s on an
    AVX2 Zen 3, against 89 with a 6 x 16 tile (768x768, 128 tokens).
    """

    name: str  # "avx512" | "avx2" | "other" (no AVX2: kernels still compile, with narrower vectors)
    lanes: int  # float32 lanes of one vector register: 16 (AVX-512), 8 (AVX2 and narrower)
    registers: int  # vector registers: 32 (AVX-512), 16 (AVX2)
    int8_dot: str | None  # the u8 x s8 -> s32 dot of 4 products: "vnni" (vpdpbusd), "avx2" (vpmaddubsw + vpmaddwd)

    @property
    def accumulators(self) -> int:
        """Vector accumulators a register tile may hold: three quarters of the registers (the rest
        hold the loaded and broadcast operands)."""
        return self.registers * 3 // 4


def isa_of(target: "tvm.target.Target") -> VectorISA:
    """The vector unit an LLVM target (host_target(), or a remote device's) compiles for."""
    has = lambda feature: bool(tvm.target.codegen.target_has_features(feature, target))  # noqa: E731
    if has("avx512f"):
        return VectorISA("avx512", 16, 32, "vnni" if has("avx512vnni") else "avx2")
    if has("avx2"):
        return VectorISA("avx2", 8, 16, "avx2")
    return VectorISA("other", 8, 16, None)


@functools.cache
def host_isa() -> VectorISA:
    """The vector unit of this machine (what `host_target` compiles for)."""
    return isa_of(host_target())


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
    host here or for a remote device's target (measure/remote.py).
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


def token_tile(tokens: int, at_most: int) -> int:
    """Tokens per register tile: the largest power of two <= min(tokens, at_most).

    A tile need not divide the token count. A kernel runs ceil(tokens / tile) tiles and moves the last
    one back to end at the last token (`tile_starts`): it overlaps its neighbour, recomputes a few
    tokens and writes the same values. So every count (27, 31, 97) keeps full-width vectors instead of
    falling back to one-token tiles, and a tiled loop does at most the work of the next multiple of
    the tile.
    """
    limit = max(1, min(tokens, at_most))
    return 1 << (limit.bit_length() - 1)


def tile_starts(tokens: int, tile: int) -> list[int]:
    """First token of each of the ceil(tokens / tile) tiles, the last moved back to end at `tokens`
    (the kernels compute the same in TIR as T.min(t0 * tile, tokens - tile))."""
    return [min(t0 * tile, tokens - tile) for t0 in range(-(-tokens // tile))]


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


# X [tokens, in] | X^T [in, tokens] | [ceil(tokens / tile), in, tile], the tiles of `tile_starts`
X_LAYOUTS = ("row-major", "feature-major", "tiles")


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
    """A sparse weight ready for its family's kernel: what to compile, and the kernel's arguments.

    The single-layer runner (`Kernel`) and the whole-model graph (model.graph) both build the call from
    this, so a family's packing and argument order live in its module alone (its `pack` function).
    """

    source: KernelSource  # the PrimFunc to compile (once per shape, pattern and knobs)
    shape: tuple[int, int]  # (out, in) of the weight
    tokens: int  # rows of X the kernel is specialised for
    weights: tuple[np.ndarray, ...]  # the kernel's arguments after X and before Y, in order
    x_layout: str  # X_LAYOUTS: how the kernel reads X
    tile: int = 1  # tokens per register tile (`token_tile`), and per tile of x_layout "tiles"
    y_feature_major: bool = True  # writes Y^T float32 [out, tokens] (else Y [tokens, out])

    def x_of(self, x: np.ndarray) -> np.ndarray:
        """X float32 [tokens, in] row-major laid out as the kernel reads it."""
        if self.x_layout == "row-major":
            return x
        if self.x_layout == "feature-major":
            return x.T
        return np.stack([x[t:t + self.tile].T for t in tile_starts(x.shape[0], self.tile)])


class Kernel:
    """A compiled kernel for Y = X @ W^T with one packed weight (`Packed`), callable on any X of its shape.

    `kernel(x, y)` runs on the caller's buffers (tvm or torch tensors in the packing's layouts); the
    host compile happens on first use, so a kernel meant for a remote device is never compiled for
    this one. `bind(x)` keeps one X (and an output buffer) for timing: then `run()` reuses the
    preallocated buffers and `output()` returns Y float32 [tokens, out] whatever the layout.
    """

    def __init__(self, packed: Packed):
        self.packed = packed
        self.source = packed.source
        self._weights = tuple(tensor(w) for w in packed.weights)
        self._feature_major = packed.y_feature_major
        self._args: tuple = ()

    @functools.cached_property
    def _fn(self):
        return compile_source(self.source)

    def __call__(self, x, y) -> None:
        """Y (or Y^T) into `y` from `x` (X in the packing's layout): the caller's buffers."""
        self._fn(x, *self._weights, y)

    def bind(self, x: np.ndarray) -> "Kernel":
        """Keep X float32 [tokens, in] (laid out as the kernel reads it) and an output buffer; returns self."""
        tokens, out_f = self.packed.tokens, self.packed.shape[0]
        assert x.shape == (tokens, self.packed.shape[1]), f"X {x.shape} for a kernel of {tokens} x {self.packed.shape[1]}"
        self._args = (tensor(self.packed.x_of(x)), *self._weights,
                      empty((out_f, tokens) if self._feature_major else (tokens, out_f)))
        return self

    def compile(self) -> "Kernel":
        """Compile for the host now (else on the first run); returns self."""
        self._fn
        return self

    def arrays(self) -> list[np.ndarray]:
        """The bound arguments as NumPy arrays, output buffer last (what a remote device is sent)."""
        return [a.numpy() for a in self._args]

    def to_output(self, y: np.ndarray) -> np.ndarray:
        """The output buffer's contents as Y float32 [tokens, out]."""
        return np.ascontiguousarray(y.T) if self._feature_major else y

    def run(self) -> None:
        self._fn(*self._args)

    def output(self) -> np.ndarray:
        self.run()
        return self.to_output(self._args[-1].numpy())
