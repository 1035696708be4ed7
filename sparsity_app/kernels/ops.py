"""The encoder's other operators, hand-scheduled in TensorIR for the host CPU, feature-major.

Between linears the encoder keeps its activations feature-major, X^T float32 [features, tokens]
(tokens = batch * seq, batch-major), the layout the sparse kernels read and write without a
transpose (see kernels/bsr.py). Every operator here therefore vectorises over tokens: layer norm
reduces over rows with one vector of 16 token columns per lane group, softmax reduces over the
keys of a transposed score matrix S^T [keys, queries] the same way, and the elementwise ones
(bias + GELU) stream rows.

Token loops are cut into tiles; a count that the tile does not divide gets one last tile that
overlaps its neighbour (it recomputes a few tokens and writes the same values), so every tile
runs the full-width vector code.

exp and erf are polynomial (Cephes' exp, Eigen's erf, as topi.fast_exp / fast_erf): TVM lowers
T.exp / T.erf to a scalar libm call per element, which made the default erf GELU cost 2.5 ms.
"""
from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from sparsity_app.kernels import host_isa, tir_builder, token_tile


def _tiles(n: int, tile: int) -> tuple[int, int]:
    """(tile, count) covering n: the tile shrinks to a power of two <= n if n < tile (31 vector lanes
    would be split into 16 + 8 + 4 + 2 + 1: attention at 31 tokens ran 7x slower than at 32); the
    last tile may overlap."""
    tile = token_tile(n, tile)
    return tile, -(-n // tile)


def fast_exp(x):
    """exp(x) for float32 x (Cephes): relative error ~1e-7; flushes below e^-87 to ~0."""
    x = tirx.max(tirx.min(x, T.float32(88.3762626647950)), T.float32(-87.3365478515625))
    n = tirx.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    z = x - n * T.float32(0.693359375) + n * T.float32(2.12194440e-4)
    y = T.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = y * z + T.float32(c)
    y = y * z * z + z + T.float32(1)
    two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return y * two_n


_ERF_A = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_B = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def fast_erf(x):
    """erf(x) for float32 x (Eigen's rational approximation): absolute error < 4e-7."""
    x = tirx.max(tirx.min(x, T.float32(4)), T.float32(-4))
    x2 = x * x
    p = T.float32(_ERF_A[0])
    for c in _ERF_A[1:]:
        p = x2 * p + T.float32(c)
    q = T.float32(_ERF_B[0])
    for c in _ERF_B[1:]:
        q = x2 * q + T.float32(c)
    return x * p / q


@tir_builder
def bias_gelu_prim_func(features: int, tokens: int):
    """PrimFunc(Y, bias, G): G = gelu(Y + bias) (erf GELU, as BERT's), feature-major.

    Y: float32 [features, tokens]; bias: float32 [features]; G: float32 [features, tokens].
    """
    tile, n_tiles = _tiles(tokens, 64)

    @T.prim_func
    def bias_gelu(Y: T.Buffer((features, tokens), "float32"), bias: T.Buffer((features,), "float32"),
                  G: T.Buffer((features, tokens), "float32")):
        T.func_attr({"tirx.noalias": True})
        for f in T.parallel(features):
            for t0 in range(n_tiles):
                for t in T.vectorized(tile):
                    G[f, T.min(t0 * tile, tokens - tile) + t] = T.float32(0.5) * (
                        Y[f, T.min(t0 * tile, tokens - tile) + t] + bias[f]) * (T.float32(1) + fast_erf(
                            (Y[f, T.min(t0 * tile, tokens - tile) + t] + bias[f]) * T.float32(math.sqrt(0.5))))

    return bias_gelu


@tir_builder
def add_layer_norm_prim_func(features: int, tokens: int, eps: float, batch: int = 1, row_major_out: bool = False,
                             ld: int | None = None):
    """PrimFunc(Y, bias, R, gamma, beta, Z): Z = LayerNorm(Y + bias + R) over features, per token.

    Y, R: float32 [features, ld] (the linear's output without its bias, and the residual; ld >=
    tokens columns, default tokens; only the first `tokens` are normalised); bias, gamma, beta:
    float32 [features]; Z: float32 [features, ld], or with row_major_out float32 [batch,
    tokens / batch, features] (the encoder's last_hidden_state).
    """
    ld = ld or tokens
    tile, n_tiles = _tiles(tokens, 16)
    seq = tokens // batch
    z_shape = (batch, seq, features) if row_major_out else (features, ld)
    inv_n = 1.0 / features

    @T.prim_func
    def add_layer_norm(Y: T.Buffer((features, ld), "float32"), bias: T.Buffer((features,), "float32"),
                       R: T.Buffer((features, ld), "float32"), gamma: T.Buffer((features,), "float32"),
                       beta: T.Buffer((features,), "float32"), Z: T.Buffer(z_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        for t0 in T.parallel(n_tiles):
            v = T.alloc_buffer((features, tile), "float32", scope="global")
            mean = T.alloc_buffer((tile,), "float32", scope="local")
            var = T.alloc_buffer((tile,), "float32", scope="local")
            for t in T.vectorized(tile):
                mean[t] = T.float32(0)
                var[t] = T.float32(0)
            for f in range(features):
                for t in T.vectorized(tile):
                    v[f, t] = Y[f, T.min(t0 * tile, tokens - tile) + t] + bias[f] + R[f, T.min(t0 * tile, tokens - tile) + t]
                    mean[t] = mean[t] + v[f, t]
            for t in T.vectorized(tile):
                mean[t] = mean[t] * T.float32(inv_n)
            for f in range(features):
                for t in T.vectorized(tile):
                    var[t] = var[t] + (v[f, t] - mean[t]) * (v[f, t] - mean[t])
            for t in T.vectorized(tile):
                var[t] = T.float32(1) / T.sqrt(var[t] * T.float32(inv_n) + T.float32(eps))
            for f in range(features):
                for t in T.vectorized(tile):
                    if row_major_out:
                        Z[(T.min(t0 * tile, tokens - tile) + t) // seq, (T.min(t0 * tile, tokens - tile) + t) % seq, f] = (
                            v[f, t] - mean[t]) * var[t] * gamma[f] + beta[f]
                    else:
                        Z[f, T.min(t0 * tile, tokens - tile) + t] = (v[f, t] - mean[t]) * var[t] * gamma[f] + beta[f]

    return add_layer_norm


@tir_builder
def embed_layer_norm_prim_func(batch: int, seq: int, vocab: int, positions: int, features: int, eps: float,
                               ld: int | None = None):
    """PrimFunc(ids, word, pos, type0, gamma, beta, X): BERT's embeddings, feature-major out.

    ids: int64 [batch, seq]; word: float32 [vocab, features]; pos: float32 [positions, features]
    (token s gets position s); type0: float32 [features] (token type 0); gamma, beta: float32
    [features]; X: float32 [features, ld] = LayerNorm(word[ids] + pos + type0)^T, columns past
    batch * seq (padding of the row stride, see model/graph.py) set to zero.
    Scheduled as add_layer_norm, a tile of 16 tokens per task (rows of `word` gathered per lane).
    """
    tokens = batch * seq
    ld = ld or tokens
    tile, n_tiles = _tiles(tokens, 16)
    inv_n = 1.0 / features

    @T.prim_func
    def embed_layer_norm(ids: T.Buffer((batch, seq), "int64"), word: T.Buffer((vocab, features), "float32"),
                         pos: T.Buffer((positions, features), "float32"), type0: T.Buffer((features,), "float32"),
                         gamma: T.Buffer((features,), "float32"), beta: T.Buffer((features,), "float32"),
                         X: T.Buffer((features, ld), "float32")):
        T.func_attr({"tirx.noalias": True})
        for f in range(features):
            for c in range(ld - tokens):
                X[f, tokens + c] = T.float32(0)
        for t0 in T.parallel(n_tiles):
            v = T.alloc_buffer((features, tile), "float32", scope="global")
            row = T.alloc_buffer((tile,), "int32", scope="local")
            mean = T.alloc_buffer((tile,), "float32", scope="local")
            var = T.alloc_buffer((tile,), "float32", scope="local")
            for t in range(tile):
                row[t] = T.Cast("int32", ids[(T.min(t0 * tile, tokens - tile) + t) // seq,
                                             (T.min(t0 * tile, tokens - tile) + t) % seq])
                for f in T.vectorized(features):
                    v[f, t] = word[row[t], f] + pos[(T.min(t0 * tile, tokens - tile) + t) % seq, f] + type0[f]
            for t in T.vectorized(tile):
                mean[t] = T.float32(0)
                var[t] = T.float32(0)
            for f in range(features):
                for t in T.vectorized(tile):
                    mean[t] = mean[t] + v[f, t]
            for t in T.vectorized(tile):
                mean[t] = mean[t] * T.float32(inv_n)
            for f in range(features):
                for t in T.vectorized(tile):
                    var[t] = var[t] + (v[f, t] - mean[t]) * (v[f, t] - mean[t])
            for t in T.vectorized(tile):
                var[t] = T.float32(1) / T.sqrt(var[t] * T.float32(inv_n) + T.float32(eps))
            for f in range(features):
                for t in T.vectorized(tile):
                    X[f, T.min(t0 * tile, tokens - tile) + t] = (v[f, t] - mean[t]) * var[t] * gamma[f] + beta[f]

    return embed_layer_norm


# Register tiles of the attention matmuls per vector unit (kernels.host_isa): see _attention_common. Measured
# per call of the fused kernel, 12 heads x 32 features x 128 tokens: AVX-512 64 x 4 x 4 (16 accumulators
# of 32 registers); on AVX2 that tile spilled (0.88 ms), 32 x 2 x 2 ran 0.49 ms (8 of 16).
ATTENTION_TILES = {"avx512": {"queries": 64, "keys": 4, "features": 4},
                   "avx2": {"queries": 32, "keys": 2, "features": 2}}


def _attention_common(batch, seq, heads, head_dim):
    """Register tiles: it queries (vector lanes) x jt keys in Q K^T, x dt head features in P V."""
    tiles = ATTENTION_TILES.get(host_isa().name, ATTENTION_TILES["avx2"])
    it, n_it = _tiles(seq, tiles["queries"])
    jt = min(tiles["keys"], seq)
    n_jt = -(-seq // jt)
    dt = next(d for d in range(tiles["features"], 0, -1) if head_dim % d == 0)
    return it, n_it, jt, n_jt, dt


NEG = -3.4028234663852886e38  # HF's additive mask: torch.finfo(float32).min


def _scores_macro(seq: int, heads: int, head_dim: int, q_offset: int, k_offset: int, scale: float):
    """T.macro scores(Q, K, bq, bk, mask, S, g, task): S[g, j, i] = S^T[key j, query i] of task's
    (sequence, head) = (K + bk)^T (Q + bq) * scale + mask, in tiles of jt keys x it queries.
    Shared by the fused attention and its split twin, so the breakdown times the same code."""
    it, n_it, jt, n_jt, _ = _attention_common(1, seq, heads, head_dim)

    @T.macro
    def scores(Q, K, bq, bk, mask, S, g, task):
        qs = T.alloc_buffer((head_dim, seq), "float32", scope="global")
        acc = T.alloc_buffer((jt, it), "float32", scope="local")
        for d in range(head_dim):
            for i in T.vectorized(seq):
                qs[d, i] = (Q[q_offset + (task % heads) * head_dim + d, (task // heads) * seq + i]
                            + bq[(task % heads) * head_dim + d]) * T.float32(scale)
        for j0 in range(n_jt):
            for i0 in range(n_it):
                for jj in T.unroll(jt):
                    for ii in T.vectorized(it):
                        acc[jj, ii] = T.float32(0)
                for d in range(head_dim):
                    for jj in T.unroll(jt):
                        for ii in T.vectorized(it):
                            acc[jj, ii] = acc[jj, ii] + (
                                K[k_offset + (task % heads) * head_dim + d, (task // heads) * seq + T.min(j0 * jt, seq - jt) + jj]
                                + bk[(task % heads) * head_dim + d]) * qs[d, T.min(i0 * it, seq - it) + ii]
                for jj in T.unroll(jt):
                    for ii in T.vectorized(it):
                        S[g, T.min(j0 * jt, seq - jt) + jj, T.min(i0 * it, seq - it) + ii] = acc[jj, ii] + T.if_then_else(
                            mask[task // heads, T.min(j0 * jt, seq - jt) + jj] != T.int64(0), T.float32(0), T.float32(NEG))

    return scores


def _context_macro(seq: int, heads: int, head_dim: int, v_offset: int, normalise: bool):
    """T.macro context(P, V, bv, inv_sum, O, g, task): O^T[d, i] = sum_j (V + bv)[d, j] P[g, j, i] for
    task's (sequence, head), times inv_sum[i] if `normalise` (the fused kernel keeps exp() and its
    column sums apart; the split softmax has already divided, and passes any buffer as inv_sum)."""
    it, n_it, _, _, dt = _attention_common(1, seq, heads, head_dim)

    @T.macro
    def context(P, V, bv, inv_sum, O, g, task):
        acc2 = T.alloc_buffer((dt, it), "float32", scope="local")
        for d0 in range(head_dim // dt):
            for i0 in range(n_it):
                for dd in T.unroll(dt):
                    for ii in T.vectorized(it):
                        acc2[dd, ii] = T.float32(0)
                for j in range(seq):
                    for dd in T.unroll(dt):
                        for ii in T.vectorized(it):
                            acc2[dd, ii] = acc2[dd, ii] + (
                                V[v_offset + (task % heads) * head_dim + d0 * dt + dd, (task // heads) * seq + j]
                                + bv[(task % heads) * head_dim + d0 * dt + dd]) * P[g, j, T.min(i0 * it, seq - it) + ii]
                for dd in T.unroll(dt):
                    for ii in T.vectorized(it):
                        if normalise:
                            O[(task % heads) * head_dim + d0 * dt + dd, (task // heads) * seq + T.min(i0 * it, seq - it) + ii] = (
                                acc2[dd, ii] * inv_sum[T.min(i0 * it, seq - it) + ii])
                        else:
                            O[(task % heads) * head_dim + d0 * dt + dd, (task // heads) * seq + T.min(i0 * it, seq - it) + ii] = (
                                acc2[dd, ii])

    return context


@tir_builder
def attention_prim_func(batch: int, seq: int, heads: int, head_dim: int, q_rows: int, offsets: tuple[int, int, int],
                        scale: float, ld: int | None = None):
    """PrimFunc(Q, K, V, bq, bk, bv, mask, O): multi-head self-attention, fused per (sequence, head).

    Q, K, V: float32 [q_rows, tokens], feature-major linear outputs without bias; head h of Q is
    rows offsets[0] + h * head_dim ... (so one fused QKV output [3 * hidden, tokens] can be passed
    three times with offsets 0, hidden, 2 * hidden); bq, bk, bv: float32 [hidden];
    mask: int64 [batch, seq], 0 = padding key; O: float32 [hidden, tokens] (context, feature-major).
    Every [*, tokens] buffer may have ld >= tokens columns (see model/graph.py); O's extra ones are zeroed.
    Per task: S^T [keys, queries] = (K + bk)^T (Q + bq) * scale + mask, a softmax down each column
    (vectorised over queries), then O^T = (V + bv) P^T, each column scaled by 1 / its sum.
    """
    tokens, hidden = batch * seq, heads * head_dim
    ld = ld or tokens
    it, n_it, _, _, _ = _attention_common(batch, seq, heads, head_dim)
    qo, ko, vo = offsets
    scores = _scores_macro(seq, heads, head_dim, qo, ko, scale)
    context = _context_macro(seq, heads, head_dim, vo, normalise=True)

    @T.prim_func
    def attention(Q: T.Buffer((q_rows, ld), "float32"), K: T.Buffer((q_rows, ld), "float32"),
                  V: T.Buffer((q_rows, ld), "float32"), bq: T.Buffer((hidden,), "float32"),
                  bk: T.Buffer((hidden,), "float32"), bv: T.Buffer((hidden,), "float32"),
                  mask: T.Buffer((batch, seq), "int64"), O: T.Buffer((hidden, ld), "float32")):
        T.func_attr({"tirx.noalias": True})
        for r in range(hidden):
            for c in range(ld - tokens):
                O[r, tokens + c] = T.float32(0)
        for task in T.parallel(batch * heads):
            st = T.alloc_buffer((1, seq, seq), "float32", scope="global")  # one group: the macros' S[g]
            pt = T.alloc_buffer((1, seq, seq), "float32", scope="global")
            mx = T.alloc_buffer((it,), "float32", scope="local")
            sm = T.alloc_buffer((seq,), "float32", scope="global")
            scores(Q, K, bq, bk, mask, st, 0, task)
            # softmax down each column into pt (not in place: a last tile that overlaps its
            # neighbour must recompute from unchanged scores); sm[i] = 1 / sum_j exp
            for i0 in range(n_it):
                for ii in T.vectorized(it):
                    mx[ii] = T.float32(NEG)
                for j in range(seq):
                    for ii in T.vectorized(it):
                        mx[ii] = T.max(mx[ii], st[0, j, T.min(i0 * it, seq - it) + ii])
                for ii in T.vectorized(it):
                    sm[T.min(i0 * it, seq - it) + ii] = T.float32(0)
                for j in range(seq):
                    for ii in T.vectorized(it):
                        pt[0, j, T.min(i0 * it, seq - it) + ii] = fast_exp(st[0, j, T.min(i0 * it, seq - it) + ii] - mx[ii])
                        sm[T.min(i0 * it, seq - it) + ii] = sm[T.min(i0 * it, seq - it) + ii] + pt[0, j, T.min(i0 * it, seq - it) + ii]
                for ii in T.vectorized(it):
                    sm[T.min(i0 * it, seq - it) + ii] = T.float32(1) / sm[T.min(i0 * it, seq - it) + ii]
            context(pt, V, bv, sm, O, 0, task)

    return attention


@tir_builder
def attention_scores_prim_func(batch: int, seq: int, heads: int, head_dim: int, q_rows: int,
                               offsets: tuple[int, int], scale: float, ld: int | None = None):
    """PrimFunc(Q, K, bq, bk, mask, S): the split attention's first kernel (see attention_prim_func).

    S: float32 [batch * heads, seq (keys), seq (queries)], S^T = (K + bk)^T (Q + bq) * scale + mask.
    """
    tokens, hidden = batch * seq, heads * head_dim
    ld = ld or tokens
    scores = _scores_macro(seq, heads, head_dim, offsets[0], offsets[1], scale)

    @T.prim_func
    def attention_scores(Q: T.Buffer((q_rows, ld), "float32"), K: T.Buffer((q_rows, ld), "float32"),
                         bq: T.Buffer((hidden,), "float32"), bk: T.Buffer((hidden,), "float32"),
                         mask: T.Buffer((batch, seq), "int64"), S: T.Buffer((batch * heads, seq, seq), "float32")):
        T.func_attr({"tirx.noalias": True})
        for task in T.parallel(batch * heads):
            scores(Q, K, bq, bk, mask, S, task, task)

    return attention_scores


@tir_builder
def softmax_prim_func(groups: int, seq: int):
    """PrimFunc(S, P): P[g, :, i] = softmax(S[g, :, i]), down each column (over keys).

    S, P: float32 [groups, seq (keys), seq (queries)]; vectorised over queries. A task owns a
    whole group: P is scaled in place, so an overlapping last tile must run after its neighbour.
    """
    it, n_it = _tiles(seq, 64)

    @T.prim_func
    def softmax(S: T.Buffer((groups, seq, seq), "float32"), P: T.Buffer((groups, seq, seq), "float32")):
        T.func_attr({"tirx.noalias": True})
        for g in T.parallel(groups):
            for i0 in range(n_it):
                mx = T.alloc_buffer((it,), "float32", scope="local")
                sm = T.alloc_buffer((it,), "float32", scope="local")
                for ii in T.vectorized(it):
                    mx[ii] = T.float32(NEG)
                    sm[ii] = T.float32(0)
                for j in range(seq):
                    for ii in T.vectorized(it):
                        mx[ii] = T.max(mx[ii], S[g, j, T.min(i0 * it, seq - it) + ii])
                for j in range(seq):
                    for ii in T.vectorized(it):
                        P[g, j, T.min(i0 * it, seq - it) + ii] = fast_exp(
                            S[g, j, T.min(i0 * it, seq - it) + ii] - mx[ii])
                        sm[ii] = sm[ii] + P[g, j, T.min(i0 * it, seq - it) + ii]
                for ii in T.vectorized(it):
                    sm[ii] = T.float32(1) / sm[ii]
                for j in range(seq):
                    for ii in T.vectorized(it):
                        P[g, j, T.min(i0 * it, seq - it) + ii] = (
                            P[g, j, T.min(i0 * it, seq - it) + ii] * sm[ii])

    return softmax


@tir_builder
def attention_context_prim_func(batch: int, seq: int, heads: int, head_dim: int, v_rows: int, offset: int,
                                ld: int | None = None):
    """PrimFunc(P, V, bv, O): the split attention's last kernel, O^T = (V + bv) P^T per (sequence, head).

    P: float32 [batch * heads, seq (keys), seq (queries)]; V: float32 [v_rows, tokens], head h
    at rows offset + h * head_dim; bv: float32 [hidden]; O: float32 [hidden, tokens].
    """
    tokens, hidden = batch * seq, heads * head_dim
    ld = ld or tokens
    context = _context_macro(seq, heads, head_dim, offset, normalise=False)

    @T.prim_func
    def attention_context(P: T.Buffer((batch * heads, seq, seq), "float32"), V: T.Buffer((v_rows, ld), "float32"),
                          bv: T.Buffer((hidden,), "float32"), O: T.Buffer((hidden, ld), "float32")):
        T.func_attr({"tirx.noalias": True})
        for r in range(hidden):
            for c in range(ld - tokens):
                O[r, tokens + c] = T.float32(0)
        for task in T.parallel(batch * heads):
            context(P, V, bv, bv, O, task, task)  # normalise=False: the softmax kernel already divided

    return attention_context


@tir_builder
def transpose_prim_func(rows: int, cols: int):
    """PrimFunc(A, B): B = A^T. A: float32 [rows, cols]; B: float32 [cols, rows] (layout changes
    around a linear whose schedule is row-major inside a feature-major graph)."""

    @T.prim_func
    def transpose(A: T.Buffer((rows, cols), "float32"), B: T.Buffer((cols, rows), "float32")):
        T.func_attr({"tirx.noalias": True})
        for c in T.parallel(cols):
            for r in range(rows):
                B[c, r] = A[r, c]

    return transpose


@tir_builder
def pack_tiles_prim_func(features: int, tokens: int, tile: int):
    """PrimFunc(X, Xp): X^T float32 [features, tokens] -> Xp [ceil(tokens / tile), features, tile] (the
    packed input of the CSR / N:M kernels' pack=True schedules; the last tile ends at the last token,
    as `kernels.tile_starts`)."""
    n_tiles = -(-tokens // tile)

    @T.prim_func
    def pack_tiles(X: T.Buffer((features, tokens), "float32"), Xp: T.Buffer((n_tiles, features, tile), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t0 in T.parallel(n_tiles):
            for f in range(features):
                for t in T.vectorized(tile):
                    Xp[t0, f, t] = X[f, T.min(t0 * tile, tokens - tile) + t]

    return pack_tiles
