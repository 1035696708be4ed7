"""Unstructured sparse (CSR) x dense: Y^T = W @ X^T with W in CSR, in TensorIR for the host CPU.

A 1x1 BSR kernel vectorised over the block's rows runs one lane wide. This kernel vectorises over
tokens instead: for each stored weight w[i, k] it broadcasts the value and adds value * X^T[k, tile]
into a register accumulator acc[tile] for output row i. X is feature-major, X^T [in, tokens], so
those loads are contiguous; with pack=True X is further packed per token tile, Xp [tokens / tile,
in, tile], so the tile of X a task reads is one contiguous block that stays in cache while every
row of its part streams past (rows-outer order re-reads X per row; tiles-outer reads it once).
Knobs (`CSRKnobs`): token tile, packing, and the parallel split (rows, or nnz-balanced parts).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tvm.script import tirx as T

from sparsity_app.kernels import Kernel, KernelSource, Packed, balanced_parts, max_threads, tir_builder, token_tile
from sparsity_app.prune.formats import CSR, stacked_indptr

SPLITS = ("rows", "nnz")


@dataclasses.dataclass(frozen=True)
class CSRKnobs:
    tile: int = 64  # at most this many tokens per register accumulator (tile / 16 AVX-512 registers)
    pack: bool = False  # X packed per token tile [ceil(tokens / tile), in, tile] instead of X^T
    split: str = "nnz"  # "rows": a task per row; "nnz": a task per thread, rows balanced by nnz

    def __post_init__(self):
        if self.split not in SPLITS or self.tile < 1:
            raise ValueError(f"invalid CSR knobs {self}")

    def label(self) -> str:
        return f"tile {self.tile}, {'packed X tiles' if self.pack else 'X^T'}, parallel over {self.split}"


@tir_builder
def csr_prim_func(tokens: int, shape: tuple[int, int], nnz: int, knobs: CSRKnobs, n_parts: int = 1):
    """PrimFunc(X, values, indices, indptr, parts, Y).

    X: float32 [in, tokens], or [ceil(tokens / tile), in, tile] if packed (`tile_starts`); values: float32 [nnz];
    indices, int32 [nnz]; indptr: int32 [out + 1]; parts: int32 [n_parts + 1], row bounds of
    split="nnz"; Y: float32 [out, tokens] (Y^T). nnz >= 1 (pass one unused zero if empty).
    """
    out_f, in_f = shape
    tile = token_tile(tokens, knobs.tile)  # need not divide tokens: the last tile overlaps its neighbour
    n_tiles = -(-tokens // tile)
    x_shape = (n_tiles, in_f, tile) if knobs.pack else (in_f, tokens)

    @T.macro
    def row_tile(X, values, indices, indptr, Y, i, t0):
        """Y^T[i, t0-th tile of tokens] = sum over row i's stored weights of value * X^T[col, tile]."""
        first = T.min(t0 * tile, tokens - tile)  # the last tile ends at the last token
        acc = T.alloc_buffer((tile,), "float32", scope="local")
        for t in T.vectorized(tile):
            acc[t] = T.float32(0)
        for k in range(indptr[i], indptr[i + 1]):
            for t in T.vectorized(tile):
                if knobs.pack:
                    acc[t] = acc[t] + values[k] * X[t0, indices[k], t]
                else:
                    acc[t] = acc[t] + values[k] * X[indices[k], first + t]
        for t in T.vectorized(tile):
            Y[i, first + t] = acc[t]

    @T.prim_func
    def csr(X: T.Buffer(x_shape, "float32"), values: T.Buffer((nnz,), "float32"),
            indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((out_f + 1,), "int32"),
            parts: T.Buffer((n_parts + 1,), "int32"), Y: T.Buffer((out_f, tokens), "float32")):
        T.func_attr({"tirx.noalias": True})
        if knobs.split == "rows":
            for i in T.parallel(out_f):
                for t0 in range(n_tiles):
                    row_tile(X, values, indices, indptr, Y, i, t0)
        else:
            for p in T.parallel(n_parts):
                for t0 in range(n_tiles):  # tiles outer: the part's rows reuse one tile of X
                    for j in range(parts[p + 1] - parts[p]):  # see bsr.py on range(lo, hi)
                        row_tile(X, values, indices, indptr, Y, parts[p] + j, t0)

    return csr


def default_knobs(tokens: int, weight: CSR) -> CSRKnobs:
    return CSRKnobs(tile=token_tile(tokens, 64))


def candidates(tokens: int, weight: CSR) -> list[CSRKnobs]:
    """First round: token tile x packing (split nnz)."""
    out = [default_knobs(tokens, weight)]
    for tile in (16, 32, 64, 128):
        for pack in (False, True):
            out.append(CSRKnobs(token_tile(tokens, tile), pack, "nnz"))
    return list(dict.fromkeys(out))


def variants(knobs: CSRKnobs, weight: CSR) -> list[CSRKnobs]:
    """Second round: the winner split by rows instead."""
    return [dataclasses.replace(knobs, split=s) for s in SPLITS if s != knobs.split]


def pack(weight: CSR, tokens: int, knobs: CSRKnobs, n_parts: int | None = None) -> Packed:
    """The kernel's source and arguments (values, indices, indptr, parts) for one schedule; X feature-major,
    or packed in token tiles (knobs.pack). n_parts: as in bsr.pack."""
    values, indices = weight.values, weight.indices
    if weight.nnz == 0:
        values, indices = np.zeros(1, np.float32), np.zeros(1, np.int32)
    n_parts = (n_parts or max_threads()) if knobs.split == "nnz" else 1
    return Packed(KernelSource("csr", csr_prim_func, (tokens, weight.shape, values.shape[0], knobs, n_parts)),
                  weight.shape, tokens, (values, indices, weight.indptr, balanced_parts(weight.indptr, n_parts)),
                  x_layout="tiles" if knobs.pack else "feature-major", tile=token_tile(tokens, knobs.tile))


def stack_rows(weights: list[CSR]) -> CSR | None:
    """One CSR of the weights stacked by rows (Q, K, V as one [3 out, in])."""
    if any(w.shape[1] != weights[0].shape[1] for w in weights):
        return None
    return CSR(np.concatenate([w.values for w in weights]), np.concatenate([w.indices for w in weights]),
               stacked_indptr([w.indptr for w in weights], [w.nnz for w in weights]),
               (sum(w.shape[0] for w in weights), weights[0].shape[1]))


class TVMCSR(Kernel):
    """Y = X @ W^T for a CSR weight, bound to x float32 [tokens, in] row-major (laid out here as the
    schedule wants it, as a feature-major network's previous layer would produce it)."""

    def __init__(self, weight: CSR, x: np.ndarray, knobs: CSRKnobs | None = None, n_parts: int | None = None):
        self.knobs = knobs or default_knobs(x.shape[0], weight)
        super().__init__(pack(weight, x.shape[0], self.knobs, n_parts))
        self.bind(x)
