import numpy as np
import pytest
from hypothesis import given, strategies as st

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import Spec
from sparsity_app.prune.methods import ACTIVATION_AWARE, METHODS, input_norms, prune
from sparsity_app.runs import resolve


@st.composite
def weights_and_blocks(draw):
    bs_r, bs_c = draw(st.sampled_from([(1, 1), (32, 1), (1, 32), (4, 4), (8, 1), (16, 16), (2, 8)]))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    w = np.random.default_rng(seed).standard_normal((rows * bs_r, cols * bs_c)).astype(np.float32)
    return w, (bs_r, bs_c)


def _spec(**kw):
    return resolve.spec(Spec(**kw))


@given(weights_and_blocks(), st.floats(0.0, 0.99), st.sampled_from(["block", "random"]))
def test_block_masks_are_aligned_and_hit_the_target(wb, sparsity, method):
    w, (bs_r, bs_c) = wb
    mask = prune(w, _spec(method=method, block=(bs_r, bs_c), sparsity=sparsity))
    tiles = mask.reshape(w.shape[0] // bs_r, bs_r, w.shape[1] // bs_c, bs_c)
    assert (tiles.all(axis=(1, 3)) == tiles.any(axis=(1, 3))).all(), "a block is partly kept"
    n_blocks = tiles.shape[0] * tiles.shape[2]
    assert abs((1 - mask.mean()) - sparsity) <= 1 / n_blocks + 1e-9


@given(weights_and_blocks(), st.floats(0.0, 0.99))
def test_magnitude_keeps_the_largest_weights(wb, sparsity):
    w, _ = wb
    mask = prune(w, _spec(method="magnitude", sparsity=sparsity))
    assert abs((1 - mask.mean()) - sparsity) <= 1 / w.size + 1e-9
    if mask.any() and (~mask).any():
        assert np.abs(w[mask]).min() >= np.abs(w[~mask]).max()


@given(st.integers(1, 7), st.integers(2, 8), st.integers(1, 5), st.integers(1, 5), st.sampled_from(["nm", "random"]))
def test_nm_keeps_exactly_n_of_every_m(n, m, rows, groups, method):
    n = min(n, m - 1)
    w = np.random.default_rng(rows * 31 + groups).standard_normal((rows, groups * m)).astype(np.float32)
    mask = prune(w, _spec(method=method, nm=(n, m)))
    assert (mask.reshape(rows, groups, m).sum(axis=-1) == n).all()
    if method == "nm":  # the kept ones are the largest of their group
        g, k = np.abs(w).reshape(rows, groups, m), mask.reshape(rows, groups, m)
        kept_min = np.where(k, g, np.inf).min(-1)
        dropped_max = np.where(~k, g, -np.inf).max(-1)
        assert (kept_min >= dropped_max).all()


def test_block_norm_l1_and_l2_differ_where_they_should():
    # Block 0: one large weight (wins under L2), block 1: many medium ones (wins under L1).
    w = np.array([[3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    l2 = prune(w, _spec(method="block", block=(1, 4), sparsity=0.5, norm="l2"))
    l1 = prune(w, _spec(method="block", block=(1, 4), sparsity=0.5, norm="l1"))
    assert l2[0, 0] and not l2[0, 4]
    assert l1[0, 4] and not l1[0, 0]


def test_random_depends_on_seed_and_only_on_seed():
    w = np.ones((64, 64), np.float32)
    a, b, c = (prune(w, _spec(method="random", block=(4, 4), sparsity=0.5, seed=s)) for s in (0, 0, 1))
    assert (a == b).all() and not (a == c).all()


def test_every_registered_method_returns_a_mask_of_the_weight_shape():
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    norms = np.linspace(0.5, 2.0, 32)
    for method in METHODS:
        mask = prune(w, _spec(method=method, nm=(2, 4) if method == "nm" else None, block=(4, 4), sparsity=0.5),
                     norms if method in ACTIVATION_AWARE else None)
        assert mask.shape == w.shape and mask.dtype == bool


def test_wanda_with_equal_input_norms_is_magnitude_within_each_row():
    w = np.random.default_rng(1).standard_normal((16, 40)).astype(np.float32)
    mask = prune(w, _spec(method="wanda", block=(1, 1), sparsity=0.75), np.full(40, 3.0))
    assert (mask.sum(axis=1) == 10).all()  # every output row keeps the same share
    for row, keep in zip(np.abs(w), mask):
        assert row[keep].min() >= row[~keep].max()


def test_wanda_keeps_a_small_weight_on_a_loud_input():
    w = np.array([[0.1, 1.0, 0.5, 0.4]], np.float32)
    norms = np.array([100.0, 1.0, 1.0, 1.0])
    assert prune(w, _spec(method="wanda", block=(1, 1), sparsity=0.5), norms).tolist() == [[True, True, False, False]]
    assert prune(w, _spec(method="magnitude", sparsity=0.5)).tolist() == [[False, True, True, False]]
    nm_mask = prune(w, _spec(method="wanda", nm=(1, 4)), norms)
    assert nm_mask.tolist() == [[True, False, False, False]]


@given(weights_and_blocks(), st.floats(0.0, 0.99))
def test_wanda_blocks_are_aligned_and_each_block_row_keeps_its_share(wb, sparsity):
    w, (bs_r, bs_c) = wb
    norms = np.random.default_rng(w.shape[1]).random(w.shape[1]) + 0.1
    mask = prune(w, _spec(method="wanda", block=(bs_r, bs_c), sparsity=sparsity), norms)
    tiles = mask.reshape(w.shape[0] // bs_r, bs_r, w.shape[1] // bs_c, bs_c)
    assert (tiles.all(axis=(1, 3)) == tiles.any(axis=(1, 3))).all(), "a block is partly kept"
    kept = tiles.any(axis=(1, 3)).sum(axis=1)
    assert (kept == kept[0]).all() and kept[0] == tiles.shape[2] - round(sparsity * tiles.shape[2])


def test_wanda_without_activations_is_an_error_and_norms_come_from_x():
    w = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="input norms"):
        prune(w, _spec(method="wanda", block=(1, 1), sparsity=0.5))
    x = np.array([[3.0, 0.0], [4.0, 1.0]], np.float32)
    np.testing.assert_allclose(input_norms(x), [5.0, 1.0])


@pytest.mark.parametrize("kw, words", [
    (dict(method="nope"), "valid methods: magnitude, block, nm, random, wanda, sparsegpt"),
    (dict(sparsity=1.0), "sparsity must be in [0, 0.99]"),
    (dict(sparsity=-0.1), "sparsity must be in [0, 0.99]"),
    (dict(method="nm", nm=(4, 4)), "1 <= N < M"),
    (dict(method="nm"), "needs an N:M pattern"),
    (dict(tokens=0), "tokens must be"),
    (dict(norm="l3"), "valid norms"),
])
def test_bad_specs_say_what_to_change(kw, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
        resolve.spec(Spec(**kw))


def test_block_that_does_not_divide_names_the_dimension():
    with pytest.raises(UserError, match="bs_r=5 must divide the output dimension 384"):
        resolve.spec(Spec(block=(5, 1))).check_shape((384, 384))
    with pytest.raises(UserError, match="bs_c=7 must divide the input dimension 1536"):
        resolve.spec(Spec(block=(1, 7))).check_shape((384, 1536))


def test_wanda_calibrates_on_training_text_that_no_metric_scores():
    """The input norms wanda scores with come from the unlabelled training documents only: a mask
    chosen on the evaluation texts (Lee, polarity) would be tuned to the test it is scored on."""
    from sparsity_app.accuracy import metrics
    from sparsity_app.model import data
    from sparsity_app.model.catalog import PRUNING_DOCUMENTS, MiniLM, get_model
    from sparsity_app.model.pruned import layer_input_norms

    shared = get_model("minilm-l6")
    seen = []

    def spy(texts, **kw):
        seen.extend(texts)
        return shared.tokenizer()(texts, **kw)

    fresh = MiniLM()  # its own caches; the shared model and tokenizer are only read
    fresh._loaded = (shared.torch_model(), spy)
    layer = "encoder.layer.0.attention.self.query"
    norms = fresh.pruning_input_norms(layer)
    assert seen == list(data.training_documents()[:PRUNING_DOCUMENTS])
    assert not set(seen) & set(metrics.eval_texts())
    assert norms.shape == (384,) and (norms > 0).all()
    wanda = Spec(model="minilm-l6", layer=layer, method="wanda", block=(1, 1), sparsity=0.5)
    np.testing.assert_array_equal(layer_input_norms(wanda), norms)  # what the engine prunes with
