"""Block-sparse (BSR) x dense: Y = X @ W^T with W in BSR, written in TensorIR for the host CPU.

The schedule follows the dense micro-kernel: block rows of W run in parallel; for each tile of
tokens an accumulator [tile, bs_r] stays in registers while the row's stored blocks stream past,
so each weight block is loaded once per token tile and reused `tile` times, vectorised over the
block's bs_r outputs. Blocks are repacked as [nnz_blocks, bs_c, bs_r] so the vector loads are
contiguous for every block shape. Empty block rows write zeros.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from tvm.script import tirx as T

from ..formats import BSR
from . import compile_prim_func, empty, largest_divisor, tensor


@dataclasses.dataclass(frozen=True)
class BSRKnobs:
    tile: int = 8  # tokens per register tile (each loaded block is reused this many times)


def bsr_prim_func(tokens: int, shape: tuple[int, int], block: tuple[int, int], nnz_blocks: int,
                  knobs: BSRKnobs):
    """PrimFunc(X, data, indices, indptr, Y).

    X: float32 [tokens, in]; data: float32 [nnz_blocks, bs_c, bs_r] (blocks transposed);
    indices: int32 [nnz_blocks]; indptr: int32 [out / bs_r + 1]; Y: float32 [tokens, out].
    nnz_blocks must be >= 1 (an empty matrix passes one unused zero block).
    """
    out_f, in_f = shape
    bs_r, bs_c = block
    n_rows, tile = out_f // bs_r, knobs.tile

    @T.prim_func
    def bsr(X: T.Buffer((tokens, in_f), "float32"), data: T.Buffer((nnz_blocks, bs_c, bs_r), "float32"),
            indices: T.Buffer((nnz_blocks,), "int32"), indptr: T.Buffer((n_rows + 1,), "int32"),
            Y: T.Buffer((tokens, out_f), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.parallel(n_rows):
            for t0 in range(tokens // tile):
                acc = T.alloc_buffer((tile, bs_r), "float32", scope="local")
                for t in T.unroll(tile):
                    for r in T.vectorized(bs_r):
                        acc[t, r] = T.float32(0)
                for nb in range(indptr[i], indptr[i + 1]):
                    for c in range(bs_c):
                        for t in T.unroll(tile):
                            for r in T.vectorized(bs_r):
                                acc[t, r] = acc[t, r] + data[nb, c, r] * X[t0 * tile + t, indices[nb] * bs_c + c]
                for t in T.unroll(tile):
                    for r in T.vectorized(bs_r):
                        Y[t0 * tile + t, i * bs_r + r] = acc[t, r]

    return bsr


def pick_knobs(tokens: int, block: tuple[int, int]) -> BSRKnobs:
    return BSRKnobs(tile=largest_divisor(tokens, 8))


@functools.lru_cache(maxsize=64)
def _compiled(tokens: int, shape: tuple[int, int], block: tuple[int, int], nnz_blocks: int, knobs: BSRKnobs):
    return compile_prim_func(bsr_prim_func(tokens, shape, block, nnz_blocks, knobs), "bsr")


class TVMBSR:
    """Callable Y = X @ W^T for a BSR weight; `run()` reuses preallocated X and Y (for timing)."""

    def __init__(self, weight: BSR, x: np.ndarray, knobs: BSRKnobs | None = None):
        tokens = x.shape[0]
        self.knobs = knobs or pick_knobs(tokens, weight.block)
        data = weight.data.transpose(0, 2, 1)
        indices = weight.indices
        if weight.nnz_blocks == 0:  # TVM buffers cannot be empty; indptr keeps this block unused
            data, indices = np.zeros((1,) + data.shape[1:], np.float32), np.zeros(1, np.int32)
        self._fn = _compiled(tokens, weight.shape, weight.block, data.shape[0], self.knobs)
        self._args = (tensor(x), tensor(data), tensor(indices), tensor(weight.indptr), empty((tokens, weight.shape[0])))

    def run(self) -> None:
        self._fn(*self._args)

    def output(self) -> np.ndarray:
        self.run()
        return self._args[-1].numpy()
