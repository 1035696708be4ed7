"""Block-sparse (BSR) x dense: Y = X @ W^T with W in BSR, written in TensorIR for the host CPU.

Every schedule keeps an accumulator for one (block row, token tile) pair in registers while the
row's stored blocks stream past, so each loaded weight block is reused `tile` times. What varies
is a small space of knobs (`BSRKnobs`), because which schedule wins depends on the block shape:

- vec="rows": vectorise over the block's bs_r outputs. Blocks are packed [nnz_blocks, bs_c, bs_r]
  so the vector loads of W are contiguous; X is broadcast one element at a time. Good for tall
  blocks (32x1, 16x1); useless for bs_r = 1 (1x32, 1x1), whose vector would be one lane wide.
- vec="tokens": vectorise over `tile` tokens; each W element is broadcast and X^T rows are loaded
  as vectors. Needs the feature-major layout. Good for flat and small blocks.
- layout="row-major": X float32 [tokens, in], Y float32 [tokens, out] (nn.Linear's layout).
  layout="feature-major": X^T float32 [in, tokens], Y^T float32 [out, tokens], the activation
  layout sparse inference engines keep between layers (XNNPACK's sparse path uses NCHW for this
  reason); a dense GEMM costs the same in either layout, and the benchmark times both.
- unroll: unroll the loop over a block's bs_c columns.
- split="rows": one parallel task per block row, token tiles inside it; "rows*tokens": one task
  per (block row, token tile), finer grained when there are few block rows; "nnz": one task per
  thread, each a contiguous run of block rows holding about equal stored blocks (rows of a pruned
  weight keep unequal numbers of blocks, and a static split by rows leaves one thread waiting).
Empty block rows write zeros.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tvm.script import tirx as T

from sparsity_app.kernels import (Kernel, KernelSource, Packed, balanced_parts, host_isa, max_threads, tir_builder,
                                  token_tile)
from sparsity_app.prune.formats import BSR, stacked_indptr

VECS = ("rows", "tokens")
LAYOUTS = ("row-major", "feature-major")
SPLITS = ("rows", "rows*tokens", "nnz")


@dataclasses.dataclass(frozen=True)
class BSRKnobs:
    tile: int = 8  # at most this many tokens per register tile (each loaded block is reused per token); `token_tile`
    vec: str = "rows"  # vectorised axis: VECS
    layout: str = "row-major"  # X and Y layout: LAYOUTS
    unroll: bool = False  # unroll the loop over a block's bs_c columns
    split: str = "rows"  # what the parallel loop runs over: SPLITS
    rows_per_pass: int = 0  # vec="tokens": block rows accumulated per pass over the blocks (0 = all bs_r)

    def __post_init__(self):
        if self.vec not in VECS or self.layout not in LAYOUTS or self.split not in SPLITS or self.tile < 1:
            raise ValueError(f"invalid BSR knobs {self}")
        if self.vec == "tokens" and self.layout != "feature-major":
            raise ValueError("vectorising over tokens needs the feature-major layout (contiguous tokens)")
        if self.rows_per_pass and self.vec != "tokens":
            raise ValueError("rows_per_pass applies to vec='tokens' only")

    def label(self) -> str:
        passes = f", {self.rows_per_pass} rows per pass" if self.rows_per_pass else ""
        return (f"tile {self.tile}, vec {self.vec}{passes}, {self.layout}, "
                f"{'unrolled' if self.unroll else 'rolled'} columns, parallel over {self.split}")


@tir_builder
def bsr_prim_func(tokens: int, shape: tuple[int, int], block: tuple[int, int], nnz_blocks: int,
                  knobs: BSRKnobs, n_parts: int = 1):
    """PrimFunc(X, data, indices, indptr, parts, Y) for one shape, block and schedule.

    X: float32 [tokens, in], or [in, tokens] if feature-major; data: float32 [nnz_blocks, bs_c, bs_r]
    (blocks transposed); indices: int32 [nnz_blocks]; indptr: int32 [out / bs_r + 1];
    parts: int32 [n_parts + 1], block-row bounds of the parallel tasks of split="nnz"
    (`balanced_parts`; other splits ignore it); Y: float32 [tokens, out], or [out, tokens] if
    feature-major. nnz_blocks must be >= 1 (an empty matrix passes one unused zero block).
    The token tile is token_tile(tokens, knobs.tile); it need not divide tokens (the last tile overlaps).
    """
    out_f, in_f = shape
    bs_r, bs_c = block
    tile = token_tile(tokens, knobs.tile)
    n_rows, n_tiles = out_f // bs_r, -(-tokens // tile)
    cols = T.unroll if knobs.unroll else T.serial
    fm = knobs.layout == "feature-major"
    x_shape, y_shape = ((in_f, tokens), (out_f, tokens)) if fm else ((tokens, in_f), (tokens, out_f))

    rp = knobs.rows_per_pass or bs_r  # tall blocks: a few passes, each with rp x tile accumulators

    @T.macro
    def tile_vec_tokens(X, data, indices, indptr, Y, i, t0):
        """Y^T[i-th block row, t0-th token tile], rp rows at a time as acc[rp, tile], vectorised over tokens."""
        first = T.min(t0 * tile, tokens - tile)  # the last tile ends at the last token
        for h in range(bs_r // rp):
            acc = T.alloc_buffer((rp, tile), "float32", scope="local")
            for r in T.unroll(rp):
                for t in T.vectorized(tile):
                    acc[r, t] = T.float32(0)
            for nb in range(indptr[i], indptr[i + 1]):
                for c in cols(bs_c):
                    for r in T.unroll(rp):
                        for t in T.vectorized(tile):
                            acc[r, t] = acc[r, t] + data[nb, c, h * rp + r] * X[indices[nb] * bs_c + c, first + t]
            for r in T.unroll(rp):
                for t in T.vectorized(tile):
                    Y[i * bs_r + h * rp + r, first + t] = acc[r, t]

    @T.macro
    def tile_vec_rows(X, data, indices, indptr, Y, i, t0):
        """The same tile as acc[tile, bs_r], vectorised over the block's rows."""
        first = T.min(t0 * tile, tokens - tile)
        acc = T.alloc_buffer((tile, bs_r), "float32", scope="local")
        for t in T.unroll(tile):
            for r in T.vectorized(bs_r):
                acc[t, r] = T.float32(0)
        for nb in range(indptr[i], indptr[i + 1]):
            for c in cols(bs_c):
                for t in T.unroll(tile):
                    for r in T.vectorized(bs_r):
                        if fm:
                            acc[t, r] = acc[t, r] + data[nb, c, r] * X[indices[nb] * bs_c + c, first + t]
                        else:
                            acc[t, r] = acc[t, r] + data[nb, c, r] * X[first + t, indices[nb] * bs_c + c]
        for t in T.unroll(tile):
            for r in T.vectorized(bs_r):
                if fm:
                    Y[i * bs_r + r, first + t] = acc[t, r]
                else:
                    Y[first + t, i * bs_r + r] = acc[t, r]

    body = tile_vec_tokens if knobs.vec == "tokens" else tile_vec_rows

    @T.prim_func
    def bsr(X: T.Buffer(x_shape, "float32"), data: T.Buffer((nnz_blocks, bs_c, bs_r), "float32"),
            indices: T.Buffer((nnz_blocks,), "int32"), indptr: T.Buffer((n_rows + 1,), "int32"),
            parts: T.Buffer((n_parts + 1,), "int32"), Y: T.Buffer(y_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        if knobs.split == "rows":
            for i in T.parallel(n_rows):
                for t0 in range(n_tiles):
                    body(X, data, indices, indptr, Y, i, t0)
        elif knobs.split == "rows*tokens":
            for task in T.parallel(n_rows * n_tiles):
                body(X, data, indices, indptr, Y, task // n_tiles, task % n_tiles)
        else:
            for p in T.parallel(n_parts):
                for j in range(parts[p + 1] - parts[p]):  # not range(lo, hi): TVM 0.27 lowers a
                    for t0 in range(n_tiles):  # non-zero loop start under a data-dependent one wrongly
                        body(X, data, indices, indptr, Y, parts[p] + j, t0)

    return bsr


def default_knobs(tokens: int, weight: BSR) -> BSRKnobs:
    """The untuned schedule: what the kernel does before (or without) the tuner."""
    return BSRKnobs(tile=token_tile(tokens, 8))


def candidates(tokens: int, weight: BSR) -> list[BSRKnobs]:
    """The tuner's first round for this block shape: vectorised axis x layout x token tile.

    Register budget (`host_isa`): vec=rows holds tile x ceil(bs_r / lanes) accumulators, vec=tokens
    holds rows_per_pass x ceil(tile / lanes); both stay within three quarters of the vector registers
    (24 of AVX-512's 32 registers of 16 floats, 12 of AVX2's 16 of 8).
    The second round (`variants`) then tries the other splits and unrolling on the winner.
    """
    bs_r, bs_c = weight.block
    isa = host_isa()
    lanes, budget = isa.lanes, isa.accumulators
    out: list[BSRKnobs] = [default_knobs(tokens, weight)]
    if bs_r > 1:  # vectorising a one-lane axis is never worth timing
        row_vectors = -(-bs_r // lanes)
        for tile in (2, 4, 8, 16):
            if tile * row_vectors <= budget and (tile >= 4 or row_vectors > 2):
                for layout in LAYOUTS:
                    out.append(BSRKnobs(token_tile(tokens, tile), "rows", layout, bs_c > 1, "nnz"))
    for tile in (16, 32, 64, 128):
        if bs_r * -(-tile // lanes) <= budget:
            out.append(BSRKnobs(token_tile(tokens, tile), "tokens", "feature-major", bs_c > 1, "nnz"))
    for rp in (16, 8, 4):  # blocks too tall for one pass: split their rows into passes
        if bs_r > rp and bs_r % rp == 0 and rp * 2 <= budget:
            out.append(BSRKnobs(token_tile(tokens, budget // rp * lanes), "tokens", "feature-major", bs_c > 1, "nnz", rp))
    return list(dict.fromkeys(out))


def variants(knobs: BSRKnobs, weight: BSR) -> list[BSRKnobs]:
    """The tuner's second round: the first round's winner with each other split, and unroll flipped."""
    out = [dataclasses.replace(knobs, split=s) for s in SPLITS if s != knobs.split]
    if weight.block[1] > 1:
        out.append(dataclasses.replace(knobs, unroll=not knobs.unroll))
    return out


def pack(weight: BSR, tokens: int, knobs: BSRKnobs, n_parts: int | None = None) -> Packed:
    """The kernel's source and arguments (data float32 [nnz_blocks, bs_c, bs_r], blocks transposed;
    indices; indptr; parts) for one schedule. n_parts: the parallel tasks of split="nnz" (default:
    one per thread of this process's pool; a remote device or a test may ask for others)."""
    data, indices = weight.data.transpose(0, 2, 1), weight.indices
    if weight.nnz_blocks == 0:  # TVM buffers cannot be empty; indptr keeps this block unused
        data, indices = np.zeros((1,) + data.shape[1:], np.float32), np.zeros(1, np.int32)
    n_parts = (n_parts or max_threads()) if knobs.split == "nnz" else 1
    fm = knobs.layout == "feature-major"
    return Packed(KernelSource("bsr", bsr_prim_func, (tokens, weight.shape, weight.block, data.shape[0], knobs, n_parts)),
                  weight.shape, tokens, (data, indices, weight.indptr, balanced_parts(weight.indptr, n_parts)),
                  x_layout="feature-major" if fm else "row-major", tile=token_tile(tokens, knobs.tile), y_feature_major=fm)


def stack_rows(weights: list[BSR]) -> BSR | None:
    """One BSR of the weights stacked by rows (Q, K, V as one [3 out, in]), or None if their blocks differ."""
    if any(w.block != weights[0].block or w.shape[1] != weights[0].shape[1] for w in weights):
        return None
    return BSR(np.concatenate([w.data for w in weights]), np.concatenate([w.indices for w in weights]),
               stacked_indptr([w.indptr for w in weights], [w.nnz_blocks for w in weights]),
               (sum(w.shape[0] for w in weights), weights[0].shape[1]))


class TVMBSR(Kernel):
    """Y = X @ W^T for a BSR weight with one schedule, bound to x float32 [tokens, in] row-major (for a
    feature-major schedule it is transposed once here, as a feature-major network's previous layer
    would have produced it)."""

    def __init__(self, weight: BSR, x: np.ndarray, knobs: BSRKnobs | None = None, n_parts: int | None = None):
        self.knobs = knobs or default_knobs(x.shape[0], weight)
        super().__init__(pack(weight, x.shape[0], self.knobs, n_parts))
        self.bind(x)
