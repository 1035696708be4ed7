"""Dense baselines for Y = X @ W^T: a hand-scheduled TVM kernel and PyTorch's own.

The TVM kernel is a register-blocked GEMM micro-kernel: W is prepacked offline into panels
Wp [out / vn, in, vn], each parallel task owns one (panel, token tile) pair and keeps a
[tile, vn] accumulator in registers while it walks the input dimension, vectorised over vn.
Without a schedule TVM's default matmul is ~40x slower than PyTorch, which would make every
"speedup vs TVM dense" a lie.

The token tile need not divide the token count: the last tile is moved back to end at the last
token (it overlaps its neighbour, recomputes a few tokens and writes the same values), so awkward
counts (97, 127) run the same full-width micro-kernel instead of falling back to one-token tiles.
`dense_fm_prim_func` is the same GEMM for feature-major activations (X^T [in, tokens] ->
Y^T [out, tokens], the encoder graph's layout): W packed [out / mr, in, mr], an [mr, nt]
accumulator vectorised over nt tokens.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tvm.script import tirx as T

from sparsity_app.kernels import Kernel, KernelSource, Packed, host_isa, largest_divisor, tir_builder, token_tile


@dataclasses.dataclass(frozen=True)
class DenseKnobs:
    vn: int = 32  # output features per panel (vector width multiple)
    tile: int = 8  # tokens per register tile (clipped to tokens; need not divide them)


@tir_builder
def dense_prim_func(tokens: int, out_f: int, in_f: int, knobs: DenseKnobs):
    """X float32 [tokens, in], Wp float32 [out / vn, in, vn] -> Y float32 [tokens, out]."""
    vn, tile = knobs.vn, min(knobs.tile, tokens)
    n_tiles = -(-tokens // tile)

    @T.prim_func
    def dense(X: T.Buffer((tokens, in_f), "float32"), Wp: T.Buffer((out_f // vn, in_f, vn), "float32"),
              Y: T.Buffer((tokens, out_f), "float32")):
        T.func_attr({"tirx.noalias": True})
        for task in T.parallel((out_f // vn) * n_tiles):
            acc = T.alloc_buffer((tile, vn), "float32", scope="local")
            for t in T.unroll(tile):
                for v in T.vectorized(vn):
                    acc[t, v] = T.float32(0)
            for k in range(in_f):
                for t in T.unroll(tile):
                    for v in T.vectorized(vn):
                        acc[t, v] = acc[t, v] + X[T.min((task % n_tiles) * tile, tokens - tile) + t, k] * Wp[
                            task // n_tiles, k, v]
            for t in T.unroll(tile):
                for v in T.vectorized(vn):
                    Y[T.min((task % n_tiles) * tile, tokens - tile) + t, (task // n_tiles) * vn + v] = acc[t, v]

    return dense


def pick_knobs(tokens: int, out_f: int) -> DenseKnobs:
    """The register tile for this machine's vector unit (`host_isa`): two vectors of outputs (vn) by a
    token tile that keeps the accumulators in registers. AVX-512: 32 x 8 (16 of 32 registers);
    AVX2: 16 x 6 (12 of 16), 1.65 ms on 768x768 x 128 tokens where 32 x 8 spilled and took 4.4 ms."""
    isa = host_isa()
    vn = largest_divisor(out_f, 2 * isa.lanes)
    if isa.lanes == 16:
        return DenseKnobs(vn=vn, tile=min(tokens, 8 if vn >= 32 else 16))
    return DenseKnobs(vn=vn, tile=min(tokens, isa.accumulators // max(1, -(-vn // isa.lanes))))


@dataclasses.dataclass(frozen=True)
class DenseFMKnobs:
    mr: int = 8  # output features per panel (broadcast weights per input step)
    nt: int = 32  # at most this many tokens per register tile (vector lanes, `token_tile`; need not divide them)
    block: int = 64  # tokens per cache block (X^T [in, block] kept in L2 while weight panels stream)


@tir_builder
def dense_fm_prim_func(tokens: int, out_f: int, in_f: int, knobs: DenseFMKnobs):
    """X^T float32 [in, tokens], Wp float32 [out / mr, in, mr] -> Y^T float32 [out, tokens].

    A task owns one weight panel and a block of `block` tokens (tile after tile), and a thread's
    tasks run block-major: the block's X^T (in x block floats) stays in L2 while the panels stream
    past, and each panel stays in L1 across the block's tiles. (Panel-major order re-read all of
    X^T per panel: fine at 128 tokens, L3-bound at 1024 x 768.)
    """
    mr, nt = knobs.mr, token_tile(tokens, knobs.nt)  # a power of two: 27 lanes would split into 16+8+2+1
    n_tiles = -(-tokens // nt)
    # Tiles per token block, balanced so the blocks split the tiles evenly: 4 tiles in blocks of at
    # most 3 are 2 + 2, not 3 + 1 (the last block's loop repeats its last tile, so 3 + 1 ran 6 tiles:
    # dense at 125 tokens was 1.5x slower than at 128).
    n_blocks = -(-n_tiles // max(1, min(knobs.block // nt, n_tiles)))
    per_block = -(-n_tiles // n_blocks)
    n_panels = out_f // mr

    @T.prim_func
    def dense_fm(X: T.Buffer((in_f, tokens), "float32"), Wp: T.Buffer((n_panels, in_f, mr), "float32"),
                 Y: T.Buffer((out_f, tokens), "float32")):
        T.func_attr({"tirx.noalias": True})
        for task in T.parallel(n_blocks * n_panels):
            acc = T.alloc_buffer((mr, nt), "float32", scope="local")
            for j in range(per_block):
                for r in T.unroll(mr):
                    for t in T.vectorized(nt):
                        acc[r, t] = T.float32(0)
                for k in range(in_f):
                    for r in T.unroll(mr):
                        for t in T.vectorized(nt):
                            acc[r, t] = acc[r, t] + Wp[task % n_panels, k, r] * X[
                                k, T.min(T.min((task // n_panels) * per_block + j, n_tiles - 1) * nt, tokens - nt) + t]
                for r in T.unroll(mr):
                    for t in T.vectorized(nt):
                        Y[(task % n_panels) * mr + r,
                          T.min(T.min((task // n_panels) * per_block + j, n_tiles - 1) * nt, tokens - nt) + t] = acc[r, t]

    return dense_fm


def pick_fm_knobs(tokens: int, out_f: int, in_f: int = 0) -> DenseFMKnobs:
    """Panels of mr rows by tiles of two vectors of tokens, for this machine's vector unit (`host_isa`):
    AVX-512 8 x 32 (16 accumulators of 32 registers); AVX2 6 x 16 (12 of 16; 89 GFLOP/s on 768x768 x
    128 tokens where 8 x 32 spilled: 34). One token block when X^T fits in half an L2 (512 KB), else
    blocks of 64 tokens (at 1040 tokens x 3072 inputs: 191 vs 143 GFLOP/s on AVX-512)."""
    isa = host_isa()
    block = tokens if in_f * tokens * 4 <= 512 * 1024 else 64
    nt = token_tile(tokens, 2 * isa.lanes)
    mr = 8 if isa.lanes == 16 else isa.accumulators // max(1, -(-nt // isa.lanes))
    return DenseFMKnobs(mr=largest_divisor(out_f, mr), nt=nt, block=block)


def pack_fm(weight: np.ndarray, mr: int) -> np.ndarray:
    """W float32 [out, in] -> Wp [out / mr, in, mr] (each panel's weights for one input contiguous)."""
    out_f, in_f = weight.shape
    return np.ascontiguousarray(weight.reshape(out_f // mr, mr, in_f).transpose(0, 2, 1))


class TVMDense(Kernel):
    """Y = X @ W^T with W prepacked; `run()` reuses preallocated X and Y (for timing)."""

    def __init__(self, weight: np.ndarray, x: np.ndarray, knobs: DenseKnobs | None = None):
        out_f, in_f = weight.shape
        tokens = x.shape[0]
        self.knobs = knobs or pick_knobs(tokens, out_f)
        vn = self.knobs.vn
        super().__init__(Packed(KernelSource("dense", dense_prim_func, (tokens, out_f, in_f, self.knobs)), weight.shape,
                                tokens, (weight.reshape(out_f // vn, vn, in_f).transpose(0, 2, 1),),
                                x_layout="row-major", y_feature_major=False))
        self.bind(x)


class TorchDense:
    """PyTorch's dense baseline: torch.nn.functional.linear (oneDNN/MKL-backed on CPU)."""

    def __init__(self, weight: np.ndarray, x: np.ndarray):
        self._f = torch.nn.functional.linear
        self._w, self._x = torch.from_numpy(np.ascontiguousarray(weight)), torch.from_numpy(np.ascontiguousarray(x))

    def run(self):
        return self._f(self._x, self._w)

    def output(self) -> np.ndarray:
        return self.run().numpy()
