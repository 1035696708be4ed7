"""INT8 kernels for Y = X @ W^T: dense and block-sparse (BSR), float32 in and out, written in TensorIR.

Each kernel is one PrimFunc of two phases. First it quantizes X float32 [tokens, in] per token
(prune.quantize: codes uint8 = rint(x * levels / max|x[t]|) + offset, one float32 scale per token)
into a scratch buffer laid out for the second phase; then it multiplies the codes by the int8
weight codes with the CPU's integer dot and dequantizes in the epilogue:
  Y[t, n] = float32(acc[t, n] - offset * colsum[n]) * xscale[t] * wscale[n].
So a timing covers everything a float32 caller pays for, as ONNX Runtime's dynamic quantization does.

The integer dot reduces along the *input* dimension: one 32-bit lane sums four u8 x s8 products of
four consecutive inputs (`dot4`). That is why a block needs a multiple of 4 input columns here, where
float32 wants tall 32x1 blocks (its FMA broadcasts one input into the lanes of 32 rows): the weight
codes are packed in quads, int32 [..., in / 4, rows], and each lane holds one row's four codes.
- `vnni` (AVX-512 VNNI, vpdpbusd): 16 lanes, 32-bit accumulation, activations keep 8 bits.
- `avx2` (vpmaddubsw + vpmaddwd): 8 lanes; pairs are summed in saturating int16 first, so
  activations keep 7 bits (prune.quantize.LEVELS).
The dot is the target's (kernels.isa_of); a kernel is checked against prune.quantize.int8_linear,
which must agree to the bit, before it is timed.

Schedules (`Int8Knobs`): vec="rows" vectorises over a block's rows (bs_r a multiple of the lanes:
16x4 and 32x4, and 8x4 on AVX2), reads the codes token-major and writes Y [tokens, out]; vec="tokens"
vectorises over a tile of tokens (any bs_r: 1x4, 4x4), reads the codes quad-major int32 [in / 4,
tokens] and writes Y^T [out, tokens]. layout="feature-major" reads X^T [in, tokens] and writes Y^T, the
whole-model graph's layout (no transposes around the linear). The dense kernel is the vec="rows"
schedule on panels of vn rows.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tvm.script import tirx as T

from sparsity_app.core.errors import CompileError
from sparsity_app.kernels import (Kernel, KernelSource, Packed, balanced_parts, bsr, host_isa, largest_divisor, max_threads,
                                  tir_builder, token_tile)
from sparsity_app.prune.quantize import LEVELS, TINY, QuantizedBSR, QuantizedRows, quantize_rows

VECS = ("rows", "tokens")
LAYOUTS = ("row-major", "feature-major")  # of X (and of Y, for vec="rows"; vec="tokens" always writes Y^T)
SPLITS = ("rows", "nnz")
DOT_LANES = {"vnni": 16, "avx2": 8}  # int32 lanes of one integer dot


def host_dot() -> str:
    """The integer dot of this machine (kernels.VectorISA.int8_dot): "vnni" or "avx2"."""
    dot = host_isa().int8_dot
    if dot is None:
        raise CompileError("INT8 kernels need AVX2 or AVX-512 VNNI; this CPU has neither (use fp32)")
    return dot


def dot4(dot: str, acc, codes, weights):
    """acc int32xL + the L sums of four u8 x s8 products: `codes` int32xL (four activation codes per
    lane), `weights` int32xL (four weight codes per lane)."""
    lanes = DOT_LANES[dot]
    if dot == "vnni":
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), acc,
            T.reinterpret(codes, dtype="int8x64"), T.reinterpret(weights, dtype="int8x64"), dtype="int32x16")
    pairs = T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
        T.reinterpret(codes, dtype=f"int8x{4 * lanes}"), T.reinterpret(weights, dtype=f"int8x{4 * lanes}"),
        dtype=f"int16x{2 * lanes}")
    return acc + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs,
                                         T.broadcast(T.int16(1), 2 * lanes), dtype=f"int32x{lanes}")


def dequantize(acc, colsum, xscale, wscale):
    """The epilogue, one float32 expression in the reference's order: float32(acc - colsum) * xscale * wscale."""
    return (T.Cast("float32", acc - colsum) * xscale) * wscale


def _quantize_macro(tokens: int, in_f: int, dot: str, quad_major: bool, padded: int = 0, x_fm: bool = False):
    """T.macro quantize(X, codes, xscale): X float32 [tokens, in], or X^T [in, tokens] if x_fm (the graph's
    layout); codes uint8, [tokens, in] or quad-major [in / 4, padded, 4]; tokens from `tokens` to `padded`
    (a vector of tokens wider than X) get codes of zero and scale 0. Same float32 operations either way."""
    levels, offset = LEVELS[dot]
    lanes = 8  # float32 lanes of an AVX2 vector (AVX-512 splits them two to a register)

    @T.macro
    def store(codes, t, k, value):
        if quad_major:
            codes[k // 4, t, k % 4] = T.Cast("uint8", T.Cast("int32", T.nearbyint(value)) + offset)
        else:
            codes[t, k] = T.Cast("uint8", T.Cast("int32", T.nearbyint(value)) + offset)

    @T.macro
    def quantize(X, codes, xscale):
        if quad_major and padded > tokens:
            for t in range(tokens, padded):
                xscale[t] = T.float32(0)
                for k in range(in_f):
                    codes[k // 4, t, k % 4] = T.uint8(offset)
        if x_fm:  # rows of X^T stream past a vector of every token's running peak
            peak = T.alloc_buffer((tokens,), "float32")
            inv = T.alloc_buffer((tokens,), "float32")
            for t in range(tokens):
                peak[t] = T.float32(0)
            for k in range(in_f):
                for t in T.vectorized(tokens):
                    peak[t] = T.max(peak[t], T.fabs(X[k, t]))
            for t in range(tokens):
                inv[t] = T.float32(levels) / T.max(peak[t], T.float32(TINY))
                xscale[t] = peak[t] / T.float32(levels)
            for k in T.parallel(in_f):
                for t in T.vectorized(tokens):
                    store(codes, t, k, X[k, t] * inv[t])
        else:  # a token's row in vectors of `lanes` inputs (max is exact in any order)
            for t in T.parallel(tokens):
                lane_peak = T.alloc_buffer((lanes,), "float32", scope="local")
                for v in T.vectorized(lanes):
                    lane_peak[v] = T.float32(0)
                for k0 in range(in_f // lanes):
                    for v in T.vectorized(lanes):
                        lane_peak[v] = T.max(lane_peak[v], T.fabs(X[t, k0 * lanes + v]))
                peak = T.alloc_buffer((1,), "float32", scope="local")
                peak[0] = T.float32(0)
                for v in range(lanes):
                    peak[0] = T.max(peak[0], lane_peak[v])
                for k in range(in_f // lanes * lanes, in_f):
                    peak[0] = T.max(peak[0], T.fabs(X[t, k]))
                inv = T.float32(levels) / T.max(peak[0], T.float32(TINY))
                xscale[t] = peak[0] / T.float32(levels)
                for k0 in range(in_f // lanes):
                    for v in T.vectorized(lanes):
                        store(codes, t, k0 * lanes + v, X[t, k0 * lanes + v] * inv)
                for k in range(in_f // lanes * lanes, in_f):
                    store(codes, t, k, X[t, k] * inv)

    return quantize


@dataclasses.dataclass(frozen=True)
class DenseInt8Knobs:
    vn: int = 16  # output rows per panel (a multiple of the dot's lanes)
    tile: int = 6  # tokens per register tile (need not divide them)
    layout: str = "row-major"  # LAYOUTS: X [tokens, in] -> Y [tokens, out], or X^T -> Y^T (the graph's)

    def label(self) -> str:
        return f"vn={self.vn} tile={self.tile} {self.layout}"


def pick_dense_knobs(tokens: int, out_f: int, dot: str, layout: str = "row-major") -> DenseInt8Knobs:
    """Two vectors of rows by the token tile the float32 GEMM uses on this vector unit (`host_isa`)."""
    lanes = DOT_LANES[dot]
    vn = largest_divisor(out_f, 2 * lanes)
    return DenseInt8Knobs(vn, min(tokens, max(1, host_isa().accumulators // max(1, vn // lanes))), layout)


@tir_builder
def dense_int8_prim_func(tokens: int, out_f: int, in_f: int, knobs: DenseInt8Knobs, dot: str):
    """X float32 [tokens, in], Wq int32 [out / vn, in / 4, vn] (four int8 codes per int32), wscale float32
    [out], colsum int32 [out] (offset * sum of a row's codes) -> Y float32 [tokens, out]; with
    layout="feature-major" X^T [in, tokens] -> Y^T [out, tokens]."""
    lanes, vn = DOT_LANES[dot], knobs.vn
    tile = min(knobs.tile, tokens)
    n_tiles, quads = -(-tokens // tile), in_f // 4
    fm = knobs.layout == "feature-major"
    quantize = _quantize_macro(tokens, in_f, dot, quad_major=False, x_fm=fm)
    x_shape, y_shape = ((in_f, tokens), (out_f, tokens)) if fm else ((tokens, in_f), (tokens, out_f))

    @T.macro
    def put(Y, t, n, value):
        if fm:
            Y[n, t] = value
        else:
            Y[t, n] = value

    @T.prim_func
    def dense_int8(X: T.Buffer(x_shape, "float32"), Wq: T.Buffer((out_f // vn, quads, vn), "int32"),
                   wscale: T.Buffer((out_f,), "float32"), colsum: T.Buffer((out_f,), "int32"),
                   Y: T.Buffer(y_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        codes = T.alloc_buffer((tokens, in_f), "uint8")
        xscale = T.alloc_buffer((tokens,), "float32")
        quantize(X, codes, xscale)
        Xq = T.decl_buffer((tokens, quads), "int32", data=codes.data)
        for task in T.parallel((out_f // vn) * n_tiles):
            acc = T.alloc_buffer((tile, vn), "int32", scope="local")
            for t in T.unroll(tile):
                for v in T.vectorized(vn):
                    acc[t, v] = 0
            for kk in range(quads):
                for t in T.unroll(tile):
                    for j in T.unroll(vn // lanes):
                        acc[t, T.ramp(j * lanes, 1, lanes)] = dot4(
                            dot, acc[t, T.ramp(j * lanes, 1, lanes)],
                            T.broadcast(Xq[T.min((task % n_tiles) * tile, tokens - tile) + t, kk], lanes),
                            Wq[task // n_tiles, kk, T.ramp(j * lanes, 1, lanes)])
            for t in T.unroll(tile):
                for v in T.vectorized(vn):
                    put(Y, T.min((task % n_tiles) * tile, tokens - tile) + t, (task // n_tiles) * vn + v,
                        dequantize(acc[t, v], colsum[(task // n_tiles) * vn + v],
                                   xscale[T.min((task % n_tiles) * tile, tokens - tile) + t],
                                   wscale[(task // n_tiles) * vn + v]))

    return dense_int8


def pack_quads(codes: np.ndarray) -> np.ndarray:
    """int8 [..., rows, in] -> int32 [..., in / 4, rows]: each int32 one row's four consecutive codes."""
    *lead, rows, cols = codes.shape
    quads = codes.reshape(*lead, rows, cols // 4, 4)
    return np.ascontiguousarray(np.moveaxis(quads, -3, -2)).view(np.int32).reshape(*lead, cols // 4, rows)


def pack_dense(weight: QuantizedRows, tokens: int, knobs: DenseInt8Knobs | None = None, dot: str | None = None) -> Packed:
    """The dense INT8 kernel's source and arguments: panels int32 [out / vn, in / 4, vn] (`pack_quads`),
    wscale float32 [out], colsum int32 [out] (offset of this dot times each row's code sum)."""
    dot = dot or host_dot()
    (out_f, in_f), knobs = weight.codes.shape, knobs or pick_dense_knobs(tokens, weight.codes.shape[0], dot)
    panels = pack_quads(weight.codes.reshape(out_f // knobs.vn, knobs.vn, in_f))
    return Packed(KernelSource("dense_int8", dense_int8_prim_func, (tokens, out_f, in_f, knobs, dot)), (out_f, in_f),
                  tokens, (panels, weight.scales, weight.column_sums(LEVELS[dot][1])), x_layout=knobs.layout,
                  y_feature_major=knobs.layout == "feature-major")


class TVMDenseInt8(Kernel):
    """Our dense INT8 peer: Y = X @ W^T with W quantized per row (float32 in and out, activations
    quantized inside the kernel); bound to x float32 [tokens, in]."""

    def __init__(self, weight: np.ndarray, x: np.ndarray, knobs: DenseInt8Knobs | None = None, dot: str | None = None):
        self.dot = dot or host_dot()
        self.knobs = knobs or pick_dense_knobs(x.shape[0], weight.shape[0], self.dot)
        self.quantized = quantize_rows(weight)
        super().__init__(pack_dense(self.quantized, x.shape[0], self.knobs, self.dot))
        self.bind(x)


# ---- block-sparse ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Int8Knobs:
    tile: int = 8  # at most this many tokens per register tile (`token_tile`)
    vec: str = "rows"  # VECS: a block's rows (Y [tokens, out]) or a tile of tokens (Y^T [out, tokens])
    split: str = "nnz"  # SPLITS: one parallel task per block row, or a run of rows of equal work per thread
    rows_per_pass: int = 0  # vec="tokens": block rows accumulated per pass (0 = all bs_r)
    layout: str = "row-major"  # LAYOUTS: X [tokens, in] in, or X^T [in, tokens] in and Y^T [out, tokens] out

    def __post_init__(self):
        if self.vec not in VECS or self.split not in SPLITS or self.layout not in LAYOUTS or self.tile < 1:
            raise ValueError(f"invalid INT8 knobs {self}")

    def label(self) -> str:
        rp = f" rows/pass={self.rows_per_pass}" if self.rows_per_pass else ""
        return f"vec={self.vec} tile={self.tile} split={self.split}{rp} {self.layout}"


@tir_builder
def bsr_int8_prim_func(tokens: int, shape: tuple[int, int], block: tuple[int, int], nnz_blocks: int, knobs: Int8Knobs,
                       n_parts: int, dot: str):
    """X float32 [tokens, in]; data int32 [nnz_blocks, bs_c / 4, bs_r] (a block's codes in quads, `pack_quads`);
    indices int32 [nnz_blocks] (block columns); indptr int32 [out / bs_r + 1]; parts int32 [n_parts + 1];
    wscale float32 [out]; colsum int32 [out] -> Y float32 [tokens, out] (vec="rows") or Y^T [out, tokens]."""
    out_f, in_f = shape
    bs_r, bs_c = block
    lanes, quads_per_block, quads = DOT_LANES[dot], bs_c // 4, in_f // 4
    by_tokens = knobs.vec == "tokens"
    # vec="tokens" needs whole vectors of tokens: fewer tokens than lanes are padded with zero codes
    padded = max(tokens, lanes) if by_tokens else tokens
    tile = max(token_tile(tokens, knobs.tile), lanes) if by_tokens else token_tile(tokens, knobs.tile)
    n_rows, n_tiles = out_f // bs_r, -(-padded // tile)
    rp = knobs.rows_per_pass or bs_r
    x_fm = knobs.layout == "feature-major"
    y_fm = by_tokens or x_fm
    x_shape = (in_f, tokens) if x_fm else (tokens, in_f)
    y_shape = (out_f, tokens) if y_fm else (tokens, out_f)
    quantize = _quantize_macro(tokens, in_f, dot, by_tokens, padded, x_fm)

    @T.macro
    def tile_by_rows(Xq, data, indices, indptr, wscale, colsum, xscale, Y, i, t0):
        """acc[tile, bs_r]: a block's rows in vectors, each token's four codes broadcast."""
        first = T.min(t0 * tile, tokens - tile)
        acc = T.alloc_buffer((tile, bs_r), "int32", scope="local")
        for t in T.unroll(tile):
            for r in T.vectorized(bs_r):
                acc[t, r] = 0
        for nb in range(indptr[i], indptr[i + 1]):
            for c in T.unroll(quads_per_block):
                for t in T.unroll(tile):
                    for j in T.unroll(bs_r // lanes):
                        acc[t, T.ramp(j * lanes, 1, lanes)] = dot4(
                            dot, acc[t, T.ramp(j * lanes, 1, lanes)],
                            T.broadcast(Xq[first + t, indices[nb] * quads_per_block + c], lanes),
                            data[nb, c, T.ramp(j * lanes, 1, lanes)])
        for t in T.unroll(tile):
            for r in T.vectorized(bs_r):
                if y_fm:
                    Y[i * bs_r + r, first + t] = dequantize(acc[t, r], colsum[i * bs_r + r], xscale[first + t],
                                                            wscale[i * bs_r + r])
                else:
                    Y[first + t, i * bs_r + r] = dequantize(acc[t, r], colsum[i * bs_r + r], xscale[first + t],
                                                            wscale[i * bs_r + r])

    @T.macro
    def tile_by_tokens(Xq, data, indices, indptr, wscale, colsum, xscale, Y, i, t0):
        """acc[rp, tile]: tokens in vectors (quad-major codes), each row's four weight codes broadcast."""
        first = T.min(t0 * tile, padded - tile)
        for h in range(bs_r // rp):
            acc = T.alloc_buffer((rp, tile), "int32", scope="local")
            for r in T.unroll(rp):
                for t in T.vectorized(tile):
                    acc[r, t] = 0
            for nb in range(indptr[i], indptr[i + 1]):
                for c in T.unroll(quads_per_block):
                    for r in T.unroll(rp):
                        for j in T.unroll(tile // lanes):
                            acc[r, T.ramp(j * lanes, 1, lanes)] = dot4(
                                dot, acc[r, T.ramp(j * lanes, 1, lanes)],
                                Xq[indices[nb] * quads_per_block + c, T.ramp(first + j * lanes, 1, lanes)],
                                T.broadcast(data[nb, c, h * rp + r], lanes))
            for r in T.unroll(rp):
                for t in T.vectorized(tile):
                    if padded == tokens or first + t < tokens:
                        Y[i * bs_r + h * rp + r, first + t] = dequantize(
                            acc[r, t], colsum[i * bs_r + h * rp + r], xscale[first + t], wscale[i * bs_r + h * rp + r])

    body = tile_by_tokens if by_tokens else tile_by_rows
    codes_shape = (quads, padded, 4) if by_tokens else (tokens, in_f)
    xq_shape = (quads, padded) if by_tokens else (tokens, quads)

    @T.prim_func
    def bsr_int8(X: T.Buffer(x_shape, "float32"), data: T.Buffer((nnz_blocks, quads_per_block, bs_r), "int32"),
                 indices: T.Buffer((nnz_blocks,), "int32"), indptr: T.Buffer((n_rows + 1,), "int32"),
                 parts: T.Buffer((n_parts + 1,), "int32"), wscale: T.Buffer((out_f,), "float32"),
                 colsum: T.Buffer((out_f,), "int32"), Y: T.Buffer(y_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        codes = T.alloc_buffer(codes_shape, "uint8")
        xscale = T.alloc_buffer((padded,), "float32")
        quantize(X, codes, xscale)
        Xq = T.decl_buffer(xq_shape, "int32", data=codes.data)
        if knobs.split == "rows":
            for i in T.parallel(n_rows):
                for t0 in range(n_tiles):
                    body(Xq, data, indices, indptr, wscale, colsum, xscale, Y, i, t0)
        else:
            for p in T.parallel(n_parts):
                for j in range(parts[p + 1] - parts[p]):  # not range(lo, hi): see kernels/bsr.py
                    for t0 in range(n_tiles):
                        body(Xq, data, indices, indptr, wscale, colsum, xscale, Y, parts[p] + j, t0)

    return bsr_int8


def default_knobs(tokens: int, weight: QuantizedBSR, dot: str | None = None) -> Int8Knobs:
    """vec="rows" when a block's rows fill whole vectors, else vec="tokens"."""
    lanes = DOT_LANES[dot or host_dot()]
    bs_r = weight.block[0]
    if bs_r % lanes == 0:
        return Int8Knobs(tile=token_tile(tokens, max(1, host_isa().accumulators // (bs_r // lanes))), vec="rows")
    return Int8Knobs(tile=token_tile(tokens, 2 * lanes), vec="tokens", rows_per_pass=_rows_per_pass(bs_r, 2))


def _rows_per_pass(bs_r: int, vectors: int) -> int:
    """The most rows of a block (a divisor of bs_r) whose accumulators fit with `vectors` per row;
    0 when the whole block fits (one pass)."""
    rp = largest_divisor(bs_r, max(1, host_isa().accumulators // vectors))
    return 0 if rp == bs_r else rp


def candidates(tokens: int, weight: QuantizedBSR, dot: str | None = None) -> list[Int8Knobs]:
    """The tuner's first round: both vectorised axes at the tiles the register budget allows."""
    lanes, budget = DOT_LANES[dot or host_dot()], host_isa().accumulators
    bs_r = weight.block[0]
    out = [default_knobs(tokens, weight, dot)]
    if bs_r % lanes == 0:
        for tile in (2, 4, 8, 16):
            if tile * (bs_r // lanes) <= budget:
                out.append(Int8Knobs(token_tile(tokens, tile), "rows"))
    for vectors in (1, 2, 4):
        out.append(Int8Knobs(token_tile(tokens, vectors * lanes), "tokens", rows_per_pass=_rows_per_pass(bs_r, vectors)))
    both = [dataclasses.replace(k, layout=layout) for k in out for layout in LAYOUTS]  # the graph reads X^T
    return list(dict.fromkeys(both))


def variants(knobs: Int8Knobs, weight: QuantizedBSR) -> list[Int8Knobs]:
    """The tuner's second round: the winner with the other parallel split."""
    return [dataclasses.replace(knobs, split=s) for s in SPLITS if s != knobs.split]


def pack(weight: QuantizedBSR, tokens: int, knobs: Int8Knobs, n_parts: int | None = None, dot: str | None = None) -> Packed:
    """The kernel's source and arguments: data int32 [nnz_blocks, bs_c / 4, bs_r], indices, indptr, parts,
    wscale, colsum (offset of this dot times each row's code sum)."""
    dot = dot or host_dot()
    bsr = weight.bsr
    data, indices = pack_quads(bsr.data), bsr.indices
    if bsr.nnz_blocks == 0:  # TVM buffers cannot be empty; indptr keeps this block unused
        data, indices = np.zeros((1,) + data.shape[1:], np.int32), np.zeros(1, np.int32)
    n_parts = (n_parts or max_threads()) if knobs.split == "nnz" else 1
    tile = token_tile(tokens, knobs.tile)
    return Packed(KernelSource("bsr_int8", bsr_int8_prim_func,
                               (tokens, bsr.shape, bsr.block, data.shape[0], knobs, n_parts, dot)),
                  bsr.shape, tokens,
                  (data, indices, bsr.indptr, balanced_parts(bsr.indptr, n_parts), weight.scales,
                   weight.column_sums(LEVELS[dot][1])),
                  x_layout=knobs.layout, tile=tile, y_feature_major=knobs.vec == "tokens" or knobs.layout == "feature-major")


def stack_rows(weights: list[QuantizedBSR]) -> QuantizedBSR | None:
    """One weight of the weights stacked by rows (Q, K, V as one call: their shared input is quantized
    once), or None if their blocks differ. Scales are per row, so each row's arithmetic is unchanged."""
    stacked = bsr.stack_rows([w.bsr for w in weights])
    return None if stacked is None else QuantizedBSR(stacked, np.concatenate([w.scales for w in weights]))
