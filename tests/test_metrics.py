"""Whole-model real-label metrics: the dense figures, a pruned copy, no mutation, threads."""
import threading

import numpy as np
import pytest
import torch

from sparsity_app.accuracy import metrics
from sparsity_app.core.errors import UserError
from sparsity_app.model import data, hf as model_hf
from sparsity_app.model.catalog import get_model

# offline-assets.md: the unpruned all-MiniLM-L6-v2, embeddings mean-pooled and L2-normalised
DENSE = {"lee_pearson": 0.656, "polarity_probe_acc": 0.745, "polarity_zero_shot_acc": 0.695,
         "wordsim_spearman": 0.729, "simlex_spearman": 0.446, "embedding_cosine": 1.0}


@pytest.fixture(scope="module")
def minilm():
    return get_model("minilm-l6")._hf


def _magnitude_90(hf) -> dict[str, np.ndarray]:
    """Every encoder linear at 90% unstructured magnitude sparsity: float32 [out, in] each."""
    out = {}
    for info in get_model("minilm-l6").layers():
        w = hf.get_submodule(info.name).weight.detach().numpy()
        out[info.name] = np.where(np.abs(w) >= np.quantile(np.abs(w), 0.9), w, 0).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def pruned(minilm):
    return model_hf.masked_copy(minilm[0], _magnitude_90(minilm[0]))


def test_word_pair_readers():
    ws, sl = data.wordsim353(), data.simlex999()
    assert (len(ws), len(sl)) == (353, 999)
    assert ws[1] == ("tiger", "cat", 7.35) and sl[0] == ("old", "new", 1.58)
    assert all(0 <= s <= 10 for *_, s in ws + sl)


def test_dense_model_reproduces_the_reference_figures(minilm):
    got = metrics.evaluate(*minilm)
    assert set(got) == set(DENSE)
    for name, ref in DENSE.items():
        assert got[name] == pytest.approx(ref, abs=0.002), name


def test_a_copy_of_the_dense_model_scores_the_same(minilm):
    """Exercises the full path (embed, not the shared model's cache) with unchanged weights."""
    hf, tok = minilm
    copy = model_hf.masked_copy(hf, {})
    assert copy is not hf
    got = metrics.evaluate(copy, tok)
    for name, ref in DENSE.items():
        assert got[name] == pytest.approx(ref, abs=0.002), name


def test_pruned_copy_scores_lower_and_leaves_the_shared_model_alone(minilm, pruned):
    hf, tok = minilm
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    hooks = (len(hf._forward_hooks), len(hf._forward_pre_hooks))
    got = metrics.evaluate(pruned, tok)
    # measured: cosine 0.41, Lee 0.36, WordSim 0.51, SimLex 0.40, probe 0.64, zero-shot 0.59
    assert got["embedding_cosine"] < 0.8
    assert got["lee_pearson"] < DENSE["lee_pearson"] - 0.15
    assert got["wordsim_spearman"] < DENSE["wordsim_spearman"] - 0.1
    assert got["simlex_spearman"] < DENSE["simlex_spearman"] - 0.02
    assert got["polarity_probe_acc"] < DENSE["polarity_probe_acc"] - 0.05
    assert got["polarity_zero_shot_acc"] < DENSE["polarity_zero_shot_acc"]
    after = hf.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (len(hf._forward_hooks), len(hf._forward_pre_hooks)) == hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())


def test_masked_copy_sets_exactly_the_given_weights(minilm):
    hf = minilm[0]
    layer = "encoder.layer.2.intermediate.dense"
    w = np.zeros((1536, 384), np.float32)
    w[3, 5] = 1.5
    copy = model_hf.masked_copy(hf, {layer: w})
    assert np.array_equal(copy.get_submodule(layer).weight.detach().numpy(), w)
    assert hf.get_submodule(layer).weight.abs().sum() > 0  # the original keeps its own
    for name, p in copy.named_parameters():
        if name != f"{layer}.weight":
            assert torch.equal(p, hf.get_parameter(name)), name
    assert not copy.training


@pytest.mark.parametrize("weights, message", [
    ({"encoder.layer.9.attention.self.query": np.zeros((384, 384), np.float32)}, "unknown layer"),
    ({"encoder.layer.0.attention.self.query": np.zeros((384, 1536), np.float32)}, r"\[out, in\]"),
    ({"encoder.layer.0.attention.output.LayerNorm": np.zeros((384,), np.float32)}, "not an nn.Linear"),
])
def test_masked_copy_rejects_bad_weights(minilm, weights, message):
    with pytest.raises(UserError, match=message):
        model_hf.masked_copy(minilm[0], weights)


def test_dense_embeddings_of_the_wrong_shape_are_refused(minilm, pruned):
    with pytest.raises(UserError, match="dense_embeddings must be"):
        metrics.evaluate(pruned, minilm[1], dense_embeddings=np.zeros((3, 384), np.float32))


def test_embeddings_are_unit_rows_and_match_the_models_own_embed(minilm):
    hf, tok = minilm
    texts = ["a short one", "a somewhat longer sentence about the movie and its actors", "x"]
    emb = model_hf.embed(hf, tok, texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # the padding-free reference: each text alone
    alone = np.concatenate([model_hf.embed(hf, tok, [t]) for t in texts])
    np.testing.assert_allclose(emb, alone, atol=1e-5)


def test_two_threads_at_once_give_the_same_numbers_as_alone(minilm, pruned):
    hf, tok = minilm
    alone = {"dense": metrics.evaluate(model_hf.masked_copy(hf, {}), tok), "pruned": metrics.evaluate(pruned, tok)}
    together, errors = {}, []
    start = threading.Barrier(2)

    def work(name, model):
        try:
            start.wait()
            together[name] = metrics.evaluate(model, tok)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=("dense", model_hf.masked_copy(hf, {}))),
               threading.Thread(target=work, args=("pruned", pruned))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in alone:
        for metric, value in alone[name].items():
            assert together[name][metric] == pytest.approx(value, abs=1e-6), (name, metric)
