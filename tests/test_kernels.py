"""Every kernel, and every schedule the tuner may pick, against a dense NumPy reference, through one
oracle helper."""
import numpy as np
import pytest
import scipy.sparse
from hypothesis import given, settings, strategies as st

from sparsity_app.core.requests import Spec
from sparsity_app.kernels import balanced_parts, compile_prim_func, csr, empty, host_isa, nm, tensor, token_tile
from sparsity_app.kernels.bsr import TVMBSR, BSRKnobs
from sparsity_app.kernels.dense import (DenseFMKnobs, DenseKnobs, TorchDense, TVMDense, dense_fm_prim_func, pack_fm,
                                        pick_fm_knobs, pick_knobs)
from sparsity_app.measure import tuner
from sparsity_app.measure.tuner import sparse_format
from sparsity_app.prune.formats import to_bsr, to_csr, to_nm
from sparsity_app.prune.methods import prune
from sparsity_app.runs import resolve


def assert_matches_dense(kernel_output: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """The oracle: Y = X @ W^T in float64, compared within float32 accumulation tolerance."""
    want = x.astype(np.float64) @ w.astype(np.float64).T
    tol = 1e-5 * np.sqrt(x.shape[1]) * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(kernel_output, want, rtol=1e-4, atol=tol)


def _case(out_f, in_f, tokens, keep, seed=0, empty_rows=0, bs_r=1):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    mask = rng.random((out_f, in_f)) < keep
    mask[: empty_rows * bs_r] = False  # whole block rows with no block at all
    x = rng.standard_normal((tokens, in_f)).astype(np.float32)
    return w, mask, x


BLOCKS = [(1, 1), (32, 1), (16, 1), (8, 1), (4, 1), (1, 32), (4, 4), (8, 8), (16, 16), (2, 8)]


@given(block=st.sampled_from(BLOCKS), rows=st.integers(1, 4), cols=st.integers(1, 4),
       tokens=st.sampled_from([1, 3, 8, 16, 24, 27, 128]), keep=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       empty_rows=st.integers(0, 2), seed=st.integers(0, 1000))
def test_bsr_kernel_matches_dense(block, rows, cols, tokens, keep, empty_rows, seed):
    bs_r, bs_c = block
    w, mask, x = _case(rows * bs_r * 2, cols * bs_c * 2, tokens, keep, seed, empty_rows, bs_r)
    bsr = to_bsr(w, mask, block)
    assert_matches_dense(TVMBSR(bsr, x).output(), x, w * mask)


PATTERNS = [*(Spec(method="block", block=b, sparsity=0.7) for b in BLOCKS),
            Spec(method="magnitude", block=(1, 1), sparsity=0.8), Spec(method="nm", nm=(2, 4)),
            Spec(method="nm", nm=(1, 4)), Spec(method="random", nm=(3, 8)),
            *(Spec(method="block", block=b, sparsity=0.7, precision="int8") for b in ((16, 4), (1, 4), (8, 8)))]


@pytest.mark.parametrize("spec", PATTERNS, ids=lambda s: s.label())
@pytest.mark.parametrize("tokens", [27])
def test_every_schedule_the_tuner_may_pick_matches_dense(spec, tokens):
    """Both tuner rounds' knobs (the variants of every first-round candidate), per format. At 27 tokens
    every tile of 2..16 runs whole tiles and then a last one that overlaps its neighbour, and wider asks
    (32..128) are clipped to 16; fewer tokens than a tile and a single token are the property tests'."""
    spec = resolve.spec(spec)
    bs_r, bs_c = spec.block
    w, _, x = _case(bs_r * 6, bs_c * 16, tokens, 1.0, seed=7)
    mask = prune(w, spec)
    mask[:bs_r] = False if spec.nm is None else mask[:bs_r]  # an empty (block) row, where allowed
    family, weight = sparse_format(w, mask, spec)
    fam = tuner.families()[family]
    first = fam.candidates(tokens, weight)
    knobs = dict.fromkeys([fam.default(tokens, weight), *first, *(v for k in first for v in fam.variants(k, weight))])
    for k in knobs:
        got = fam.kernel(weight, x, k).output()
        if fam.reference is None:
            assert_matches_dense(got, x, w * mask)
        else:  # INT8: the quantized arithmetic, to the bit
            np.testing.assert_array_equal(got, fam.reference(weight, x), err_msg=k.label())


@given(rows=st.integers(1, 40), cols=st.integers(1, 40), tokens=st.sampled_from([1, 3, 16, 24, 27, 128]),
       keep=st.sampled_from([0.0, 0.05, 0.3, 1.0]), seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_csr_kernel_matches_dense(rows, cols, tokens, keep, seed):
    w, mask, x = _case(rows, cols, tokens, keep, seed)
    assert_matches_dense(csr.TVMCSR(to_csr(w, mask), x).output(), x, w * mask)


@given(nm_=st.sampled_from([(1, 2), (2, 4), (1, 4), (2, 8)]), rows=st.integers(1, 20), groups=st.integers(1, 6),
       tokens=st.sampled_from([1, 3, 16, 31, 128]), seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_nm_kernel_matches_dense(nm_, rows, groups, tokens, seed):
    w, _, x = _case(rows, groups * nm_[1], tokens, 1.0, seed)
    mask = prune(w, resolve.spec(Spec(method="nm", nm=nm_)))
    weight = to_nm(w, mask, nm_)
    assert weight.offsets.dtype == np.uint8 and weight.values.shape == (rows, groups * nm_[0])
    assert_matches_dense(nm.TVMNM(weight, x).output(), x, w * mask)


def test_csr_and_nm_formats_round_trip():
    w, mask, _ = _case(24, 32, 1, 0.3, seed=5)
    c = to_csr(w, mask)
    ref = scipy.sparse.csr_matrix(w * mask)
    np.testing.assert_array_equal(c.indptr, ref.indptr)
    np.testing.assert_array_equal(c.to_dense(), w * mask)
    nm_mask = prune(w, resolve.spec(Spec(method="nm", nm=(2, 8))))
    np.testing.assert_array_equal(to_nm(w, nm_mask, (2, 8)).to_dense(), w * nm_mask)
    with pytest.raises(ValueError, match="not 2:8"):
        to_nm(w, mask, (2, 8))


def test_balanced_parts_cover_every_row_once_and_even_out_work():
    indptr = np.concatenate([[0], np.cumsum([50, 0, 1, 1, 1, 1, 1, 45, 0, 0])]).astype(np.int32)
    for n in (1, 2, 3, 7, 12):
        parts = balanced_parts(indptr, n)
        assert parts[0] == 0 and parts[-1] == 10 and (np.diff(parts) >= 0).all() and len(parts) == n + 1
    parts = balanced_parts(indptr, 2)
    work = np.add.reduceat(np.diff(indptr) + 1, parts[:-1])
    assert abs(int(work[0]) - int(work[1])) <= 52  # the 50-block row cannot be split


@pytest.mark.parametrize("tile", [1, 2, 4, 8, 16])
def test_bsr_kernel_every_token_tile(tile):
    w, mask, x = _case(64, 96, 32, 0.2, seed=tile)
    assert_matches_dense(TVMBSR(to_bsr(w, mask, (16, 1)), x, BSRKnobs(tile=tile)).output(), x, w * mask)


def test_bsr_all_zero_and_fully_dense_weights():
    w, _, x = _case(64, 64, 16, 0.0)
    assert_matches_dense(TVMBSR(to_bsr(w, np.zeros_like(w, bool), (8, 8)), x).output(), x, np.zeros_like(w))
    assert_matches_dense(TVMBSR(to_bsr(w, np.ones_like(w, bool), (8, 8)), x).output(), x, w)


def test_bsr_format_is_scipys():
    w, mask, _ = _case(64, 48, 1, 0.1, seed=3)
    ours = to_bsr(w, mask, (4, 2))
    ref = scipy.sparse.bsr_matrix(w * mask, blocksize=(4, 2))
    ref.eliminate_zeros()
    ref.sort_indices()
    np.testing.assert_array_equal(ours.indptr, ref.indptr)
    np.testing.assert_array_equal(ours.indices, ref.indices)
    np.testing.assert_array_equal(ours.data, ref.data)
    np.testing.assert_array_equal(ours.to_dense(), w * mask)


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536), (40, 24), (8, 8), (100, 7)])
@pytest.mark.parametrize("tokens", [128, 5])
def test_dense_kernels_match_dense(shape, tokens):
    w, _, x = _case(*shape, tokens, 1.0)
    assert_matches_dense(TVMDense(w, x).output(), x, w)
    assert_matches_dense(TorchDense(w, x).output(), x, w)


@pytest.mark.parametrize("knobs", [DenseKnobs(vn=16, tile=4), DenseKnobs(vn=64, tile=2), DenseKnobs(vn=8, tile=1)])
def test_dense_kernel_every_knob(knobs):
    w, _, x = _case(128, 64, 16, 1.0)
    assert_matches_dense(TVMDense(w, x, knobs).output(), x, w)


# Paths the usual CI never reaches: the N:M cache-blocked loop (chunk > 0, the usual winner on
# 384- and 1536-wide layers), and every parallel split with several parts, forced on any core count.

@pytest.mark.parametrize("in_f", [384, 1536])
@pytest.mark.parametrize("nm_", [(2, 4), (1, 4)])
def test_nm_cache_blocked_path_on_real_layer_widths(in_f, nm_):
    w, _, x = _case(48, in_f, 32, 1.0, seed=in_f)
    mask = prune(w, resolve.spec(Spec(method="nm", nm=nm_)))
    weight = to_nm(w, mask, nm_)
    chunked = [k for k in nm.candidates(32, weight) if k.chunk > 0]
    assert chunked, "the tuner offers no cache-blocked schedule on this width"
    for k in chunked:
        for parts in (1, 3):
            assert_matches_dense(nm.TVMNM(weight, x, k, n_parts=parts).output(), x, w * mask)


@pytest.mark.parametrize("n_parts", [2, 3, 5])
def test_parallel_splits_with_several_parts_match_dense(n_parts):
    w, mask, x = _case(96, 64, 16, 0.3, seed=n_parts, empty_rows=1, bs_r=8)
    block_mask = prune(w, resolve.spec(Spec(method="block", block=(8, 1), sparsity=0.7)))
    block_mask[:8] = False
    bsr = to_bsr(w, block_mask, (8, 1))
    for knobs in (BSRKnobs(tile=8, split="nnz"), BSRKnobs(tile=16, vec="tokens", layout="feature-major", split="nnz")):
        assert_matches_dense(TVMBSR(bsr, x, knobs, n_parts=n_parts).output(), x, w * block_mask)
    assert_matches_dense(csr.TVMCSR(to_csr(w, mask), x, csr.CSRKnobs(tile=16, split="nnz"), n_parts=n_parts).output(),
                         x, w * mask)
    nm_mask = prune(w, resolve.spec(Spec(method="nm", nm=(2, 4))))
    assert_matches_dense(nm.TVMNM(to_nm(w, nm_mask, (2, 4)), x, nm.NMKnobs(tile=16, chunk=16), n_parts=n_parts).output(),
                         x, w * nm_mask)


def test_no_schedule_falls_back_to_a_one_token_tile_at_any_token_count():
    """Every family's default and first-round knobs, and the dense kernels of the layer runner and of
    the graph, keep a tile of the largest power of two their width allows (never 1 above 1 token)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    weights = {}
    for spec in PATTERNS:
        spec = resolve.spec(spec)
        family, weight = sparse_format(w, prune(w, spec), spec)
        weights.setdefault(family, weight)
    assert set(weights) == set(tuner.families())
    for tokens in range(1, 131):
        def full(tile, asked):
            return tile == token_tile(tokens, asked) and (tokens == 1 or tile >= 2) and 2 * tile > min(tokens, asked)
        for family, weight in weights.items():
            fam = tuner.families()[family]
            for knobs in [fam.default(tokens, weight), *fam.candidates(tokens, weight)]:
                assert full(fam.pack(weight, tokens, knobs).tile, knobs.tile), (family, tokens, knobs)
        widest = pick_knobs(4096, 384).tile  # the register tile of this machine's vector unit
        assert pick_knobs(tokens, 384).tile == min(tokens, widest)  # unrolled, not vectorised: any width
        assert full(token_tile(tokens, pick_fm_knobs(tokens, 384, 384).nt), 2 * host_isa().lanes)


@pytest.mark.parametrize("tokens", [127, 97, 13, 8])
def test_dense_awkward_token_counts_keep_a_full_tile(tokens):
    """The token tile need not divide the tokens: no fallback to one-token tiles, still exact."""
    for out_f in (384, 1536, 40):
        assert pick_knobs(tokens, out_f).tile == min(tokens, pick_knobs(4096, out_f).tile) >= min(tokens, 6)
        assert pick_fm_knobs(tokens, out_f).nt >= 8
    w, _, x = _case(96, 40, tokens, 1.0)
    assert_matches_dense(TVMDense(w, x).output(), x, w)
    assert_matches_dense(TVMDense(w, x, DenseKnobs(vn=32, tile=16)).output(), x, w)


@pytest.mark.parametrize("tokens", [128, 97, 5])
@pytest.mark.parametrize("knobs", [DenseFMKnobs(), DenseFMKnobs(mr=4, nt=64), DenseFMKnobs(mr=12, nt=16, block=48),
                                   DenseFMKnobs(mr=8, nt=16, block=10**6)])
def test_feature_major_dense_kernel(tokens, knobs):
    """Y^T = W X^T from X^T [in, tokens] and W packed in panels of mr rows."""
    w, _, x = _case(48, 40, tokens, 1.0, seed=tokens)
    k = DenseFMKnobs(knobs.mr, min(knobs.nt, tokens), knobs.block)
    y = empty((48, tokens))
    compile_prim_func(dense_fm_prim_func(tokens, 48, 40, k), "dense_fm")(tensor(x.T), tensor(pack_fm(w, k.mr)), y)
    assert_matches_dense(y.numpy().T, x, w)


@pytest.mark.parametrize("pattern", [Spec(method="block", block=(8, 1), sparsity=0.5), Spec(method="magnitude", sparsity=0.5),
                                     Spec(method="nm", nm=(2, 4))], ids=lambda s: s.label())
def test_a_kernel_is_compiled_once_and_runs_on_the_callers_buffers_for_any_x(pattern):
    from sparsity_app.kernels import Kernel

    spec, tokens = resolve.spec(pattern), 16
    w, _, _ = _case(64, 32, tokens, 1.0, seed=5)
    mask = prune(w, spec)
    name, weight = sparse_format(w, mask, spec)
    family = tuner.families()[name]
    kernel = Kernel(family.pack(weight, tokens, family.default(tokens, weight)))
    y = empty((64, tokens) if kernel.packed.y_feature_major else (tokens, 64))
    for seed in (1, 2):  # two inputs, one kernel: the caller's buffers, no second compile
        x = np.random.default_rng(seed).standard_normal((tokens, 32)).astype(np.float32)
        kernel(tensor(np.ascontiguousarray(kernel.packed.x_of(x))), y)
        assert_matches_dense(kernel.to_output(y.numpy()), x, w * mask)
    assert kernel.compile() is kernel and "_fn" in vars(kernel)  # compiled on the first call, kept


def test_register_tiles_follow_the_vector_unit():
    """The dense and attention tiles are chosen for the target's vector unit: an AVX-512 tile spills
    on AVX2 (the dense GEMM ran 2.7x slower), so the knobs read `isa_of`, not a constant."""
    import tvm

    from sparsity_app.kernels import isa_of

    avx512 = isa_of(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    avx2 = isa_of(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}))
    assert (avx512.lanes, avx512.registers, avx512.int8_dot) == (16, 32, "vnni")
    assert (avx2.lanes, avx2.registers, avx2.int8_dot) == (8, 16, "avx2")
    knobs = pick_knobs(128, 768)
    assert knobs.tile * -(-knobs.vn // host_isa().lanes) <= host_isa().accumulators
    fm = pick_fm_knobs(128, 768, 768)
    assert fm.mr * -(-fm.nt // host_isa().lanes) <= host_isa().accumulators
