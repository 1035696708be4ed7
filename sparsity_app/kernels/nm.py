"""N:M sparse x dense: Y^T = W @ X^T with W in the N:M format, in TensorIR for the host CPU.

Every group of M inputs keeps exactly N weights, so a row's loop has a fixed trip count known at
compile time (no row pointers, the N inner steps unrolled) and a column index is one byte: the
offset inside its group. Like the CSR kernel it vectorises over tokens, reading X^T [in, tokens]
(or X packed per token tile) with a register accumulator per (row, token tile).
Knobs (`NMKnobs`): token tile, cache block of inputs, packing, and the parallel split; every row
has the same work, so split="nnz" is an even split into one run of rows per thread.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tvm.script import tirx as T

from sparsity_app.kernels import Kernel, KernelSource, Packed, max_threads, tir_builder, token_tile
from sparsity_app.kernels.csr import SPLITS
from sparsity_app.prune.formats import NM


@dataclasses.dataclass(frozen=True)
class NMKnobs:
    tile: int = 64  # at most this many tokens per register accumulator (`token_tile`)
    chunk: int = 0  # inputs per cache block (a multiple of M dividing in); 0 = all inputs at once
    pack: bool = False  # X packed per token tile [ceil(tokens / tile), in, tile] instead of X^T
    split: str = "nnz"  # "rows": a task per row; "nnz": one run of rows per thread, tiles outside

    def __post_init__(self):
        if self.split not in SPLITS or self.tile < 1 or self.chunk < 0:
            raise ValueError(f"invalid N:M knobs {self}")

    def label(self) -> str:
        return (f"tile {self.tile}, {'all inputs' if not self.chunk else f'{self.chunk}-input blocks'}, "
                f"{'packed X tiles' if self.pack else 'X^T'}, parallel over {self.split}")


@tir_builder
def nm_prim_func(tokens: int, shape: tuple[int, int], nm: tuple[int, int], knobs: NMKnobs, n_parts: int = 1):
    """PrimFunc(X, values, offsets, Y).

    X: float32 [in, tokens], or [ceil(tokens / tile), in, tile] if packed (`tile_starts`); values: float32 [out, in / M * N];
    offsets: uint8 [out, in / M * N]; Y: float32 [out, tokens] (Y^T).
    Every group of M inputs lines up across rows, so the input dimension can be cut into cache
    blocks of `chunk` inputs: a thread sweeps all its rows over one block of X (chunk x tile floats,
    L1-sized) before the next, carrying each row's partial sums through Y.
    """
    out_f, in_f = shape
    n, m = nm
    kept = in_f // m * n
    tile = token_tile(tokens, knobs.tile)  # need not divide tokens: the last tile overlaps its neighbour
    n_tiles = -(-tokens // tile)
    chunk = knobs.chunk if knobs.split == "nnz" and knobs.chunk else in_f
    n_chunks, groups = in_f // chunk, chunk // m  # groups of M per cache block
    x_shape = (n_tiles, in_f, tile) if knobs.pack else (in_f, tokens)
    rows_per_part = -(-out_f // n_parts)

    @T.macro
    def row_tile(X, values, offsets, Y, i, t0, kc):
        """Y^T[i, tile t0] (+)= row i's kept weights in cache block kc times X^T."""
        # A tile runs all its cache blocks before the next tile, so the overlapping last tile starts
        # again from kc == 0 and never adds to its finished neighbour's sums.
        first = T.min(t0 * tile, tokens - tile)  # the last tile ends at the last token
        acc = T.alloc_buffer((tile,), "float32", scope="local")
        for t in T.vectorized(tile):
            acc[t] = T.if_then_else(kc == 0, T.float32(0), Y[i, first + t])
        for g in range(kc * groups, kc * groups + groups):
            for j in T.unroll(n):
                for t in T.vectorized(tile):
                    if knobs.pack:
                        acc[t] = acc[t] + values[i, g * n + j] * X[
                            t0, g * m + T.Cast("int32", offsets[i, g * n + j]), t]
                    else:
                        acc[t] = acc[t] + values[i, g * n + j] * X[
                            g * m + T.Cast("int32", offsets[i, g * n + j]), first + t]
        for t in T.vectorized(tile):
            Y[i, first + t] = acc[t]

    @T.prim_func
    def nm_kernel(X: T.Buffer(x_shape, "float32"), values: T.Buffer((out_f, kept), "float32"),
                  offsets: T.Buffer((out_f, kept), "uint8"), Y: T.Buffer((out_f, tokens), "float32")):
        T.func_attr({"tirx.noalias": True})
        if knobs.split == "rows":
            for i in T.parallel(out_f):
                for t0 in range(n_tiles):
                    row_tile(X, values, offsets, Y, i, t0, 0)
        else:
            for p in T.parallel(n_parts):
                for t0 in range(n_tiles):
                    for kc in range(n_chunks):
                        for j in range(T.max(T.min(rows_per_part, out_f - p * rows_per_part), 0)):
                            row_tile(X, values, offsets, Y, p * rows_per_part + j, t0, kc)

    return nm_kernel


def default_knobs(tokens: int, weight: NM) -> NMKnobs:
    return NMKnobs(tile=token_tile(tokens, 64))


def candidates(tokens: int, weight: NM) -> list[NMKnobs]:
    """First round: token tile x cache block (X block of chunk x tile floats near L1's 32 KB)."""
    in_f, m = weight.shape[1], weight.nm[1]
    out = [default_knobs(tokens, weight)]
    for tile in (32, 64, 128):
        tile = token_tile(tokens, tile)
        for chunk in (0, 4096 // tile, 8192 // tile, 16384 // tile):
            if chunk == 0 or (chunk % m == 0 and in_f % chunk == 0 and chunk < in_f):
                out.append(NMKnobs(tile, chunk, False, "nnz"))
    return list(dict.fromkeys(out))


def variants(knobs: NMKnobs, weight: NM) -> list[NMKnobs]:
    """Second round: the winner with packed X, and split by rows (which has no cache blocks)."""
    return [dataclasses.replace(knobs, pack=not knobs.pack),
            *[dataclasses.replace(knobs, split=s, chunk=0) for s in SPLITS if s != knobs.split]]


def pack(weight: NM, tokens: int, knobs: NMKnobs, n_parts: int | None = None) -> Packed:
    """The kernel's source and arguments (values, offsets) for one schedule; X feature-major, or packed
    in token tiles (knobs.pack). n_parts: as in bsr.pack."""
    n_parts = (n_parts or max_threads()) if knobs.split == "nnz" else 1
    return Packed(KernelSource("nm", nm_prim_func, (tokens, weight.shape, weight.nm, knobs, n_parts)),
                  weight.shape, tokens, (weight.values, weight.offsets),
                  x_layout="tiles" if knobs.pack else "feature-major", tile=token_tile(tokens, knobs.tile))


def stack_rows(weights: list[NM]) -> NM | None:
    """One N:M weight of the weights stacked by rows (Q, K, V as one [3 out, in]), or None if N:M differs."""
    if any(w.nm != weights[0].nm or w.shape[1] != weights[0].shape[1] for w in weights):
        return None
    return NM(np.concatenate([w.values for w in weights]), np.concatenate([w.offsets for w in weights]),
              weights[0].nm, (sum(w.shape[0] for w in weights), weights[0].shape[1]))


class TVMNM(Kernel):
    """Y = X @ W^T for an N:M weight, bound to x float32 [tokens, in] row-major (laid out here)."""

    def __init__(self, weight: NM, x: np.ndarray, knobs: NMKnobs | None = None, n_parts: int | None = None):
        self.knobs = knobs or default_knobs(x.shape[0], weight)
        super().__init__(pack(weight, x.shape[0], self.knobs, n_parts))
        self.bind(x)
