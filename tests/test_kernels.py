"""Every kernel against a dense NumPy reference, through one oracle helper."""
import numpy as np
import pytest
import scipy.sparse
from hypothesis import given
from hypothesis import strategies as st

from sparsity_app.formats import to_bsr
from sparsity_app.kernels.bsr import BSRKnobs, TVMBSR
from sparsity_app.kernels.dense import DenseKnobs, TorchDense, TVMDense


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
       tokens=st.sampled_from([1, 3, 8, 16, 24, 128]), keep=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       empty_rows=st.integers(0, 2), seed=st.integers(0, 1000))
def test_bsr_kernel_matches_dense(block, rows, cols, tokens, keep, empty_rows, seed):
    bs_r, bs_c = block
    w, mask, x = _case(rows * bs_r * 2, cols * bs_c * 2, tokens, keep, seed, empty_rows, bs_r)
    bsr = to_bsr(w, mask, block)
    assert_matches_dense(TVMBSR(bsr, x).output(), x, w * mask)


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
