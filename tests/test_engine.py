"""The engine end to end on real weights: proxies, cache, model catalog."""
import dataclasses
import json

import numpy as np
import pytest

from sparsity_app import Spec, UserError, run
from sparsity_app.accuracy import proxies
from sparsity_app.core.store import Store, key_of
from sparsity_app.measure.timing import fingerprint
from sparsity_app.model.catalog import get_model
from sparsity_app.runs import resolve

LAYER = "encoder.layer.0.attention.self.query"


def test_minilm_layers_from_config_are_the_real_linears():
    import torch

    model = get_model("minilm-l6")
    real = [(n, (m.out_features, m.in_features)) for n, m in model._hf[0].named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    assert [(l.name, l.shape) for l in model.layers()] == real
    assert len(real) == 36


def test_calibration_is_real_activations_of_the_layer():
    model = get_model("minilm-l6")
    x = model.calibration(LAYER, 64)
    assert x.shape == (64, 384) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.std() > 0.1  # layer-normed hidden states, not zeros
    assert not np.allclose(x, model.calibration("encoder.layer.3.attention.self.query", 64))


def test_calibration_rows_are_the_first_rows_of_the_whole_set():
    """A run forwards only the batches its rows need; those rows must be the whole set's, bit for bit."""
    from sparsity_app.model.catalog import MiniLM

    whole = get_model("minilm-l6").calibration_set(LAYER)
    fresh = MiniLM()  # nothing computed yet: the prefix path
    assert fresh._calibration_batches(1) == 1 and fresh._calibration_batches(len(whole)) == 8  # 250 texts
    assert fresh._calibration_batches(len(whole) + 1) is None
    assert [fresh._calibration_batches(n) for n in (700, 1000, 3000)] == [1, 2, 4]
    for tokens in (1, 700, 1000, 3000, 700):  # inside the first batch of 32 texts, across its end, several batches
        assert np.array_equal(fresh.calibration(LAYER, tokens), whole[:tokens]), tokens
    assert fresh._calibration_whole is None and fresh._calibration_prefix[0] == 4  # only the largest prefix kept
    for bad in (0, len(whole) + 1):
        with pytest.raises(UserError, match=f"between 1 and {len(whole)} .*calibration text has {len(whole)} tokens"):
            fresh.calibration(LAYER, bad)
    assert fresh._calibration_whole is None  # saying so forwarded nothing


def test_proxies_at_sparsity_zero_are_exact():
    model = get_model("minilm-l6")
    w, b = model.weight(LAYER)
    x = model.calibration(LAYER, 128)
    mask = np.ones_like(w, bool)
    assert proxies.retained_energy(w, mask) == 1.0
    rel, cos = proxies.output_error(x, w, w, b)
    assert rel == 0.0 and cos == pytest.approx(1.0)
    level = proxies.model_level("minilm-l6", LAYER, w)
    assert level["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert level["lee_pearson"] == pytest.approx(0.656, abs=0.002)  # the dense MiniLM's known figure


def test_proxies_fall_as_sparsity_rises():
    model = get_model("minilm-l6")
    layer = "encoder.layer.0.intermediate.dense"
    w, b = model.weight(layer)
    x = model.calibration(layer, 128)
    errs = []
    for keep in (0.5, 0.1):
        mask = np.abs(w) >= np.quantile(np.abs(w), 1 - keep)
        errs.append(proxies.output_error(x, w, w * mask, b)[0])
    assert 0 < errs[0] < errs[1] < 1.5


def test_run_then_cache_hit(cache_dir):
    store = Store()
    spec = Spec(method="block", block=(16, 1), sparsity=0.8, tokens=32, repeat=3)
    steps = []
    first = run(spec, store=store, progress=lambda step, detail: steps.append(step))
    # in order; "time" more than once when the machine was too busy to give a figure the first time
    in_order = [s for i, s in enumerate(steps) if i == 0 or s != steps[i - 1]]
    assert in_order == ["prune", "format", "tune", "compile", "verify", "time", "score"]
    assert set(first.step_s) == set(steps) and all(v >= 0 for v in first.step_s.values())
    assert not first.cached and abs(first.sparsity_achieved - 0.8) <= 16 / (384 * 384) + 1e-9
    assert first.stored_blocks == round(0.2 * 384 * 384 / 16)
    second = run(spec, store=store, progress=lambda *a: pytest.fail("a cache hit recomputed"))
    assert second.cached and second.times_ms == first.times_ms
    assert [r.spec for r in store.results(layer=LAYER)] == [first.spec]


def test_corrupt_entry_is_recomputed_not_a_crash(cache_dir):
    store = Store()
    spec = Spec(model="bert-base-synthetic", sparsity=0.95, tokens=16, repeat=3)
    run(spec, store=store)
    key = key_of(resolve.spec(spec), fingerprint())
    store._cache.set(key, "{not json")
    again = run(spec, store=store)
    assert not again.cached
    assert run(spec, store=store).cached


def test_unreadable_cache_database_starts_afresh(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "cache.db").write_bytes(b"this is not sqlite" * 100)
    store = Store(d)
    assert len(store) == 0
    assert any(p.name.startswith("cache.db.corrupt-") for p in d.iterdir())  # only the index is kept aside
    assert len(store.notes) == 1 and "was unreadable" in store.notes[0]


def test_synthetic_model_says_its_accuracy_means_nothing(cache_dir):
    r = run(Spec(model="bert-base-synthetic", layer="encoder.layer.0.intermediate.dense", tokens=16, repeat=3))
    d = r.to_dict()
    assert d["shape"] == [3072, 768] and d["real_weights"] is False
    assert "mean nothing" in d["accuracy_note"]
    assert d["proxies"]["lee_pearson"] is None


def test_nm_result_reports_the_pattern(cache_dir):
    r = run(Spec(method="nm", nm=(2, 4), tokens=16, repeat=3))
    assert r.spec.sparsity == 0.5 and r.sparsity_achieved == 0.5 and r.to_dict()["nm"] == "2:4"


def test_result_round_trips_through_json(cache_dir):
    r = run(Spec(model="bert-base-synthetic", tokens=8, repeat=3))
    back = type(r).from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == dataclasses.replace(r)


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(UserError, match="valid layers: encoder.layer.0.attention.self.query"):
        run(Spec(layer="encoder.layer.9.attention.self.query"))


def test_weights_read_from_safetensors_are_the_models_own():
    model = get_model("minilm-l6")
    w, b = model.weight("encoder.layer.1.output.dense")
    module = model._hf[0].get_submodule("encoder.layer.1.output.dense")
    np.testing.assert_array_equal(w, module.weight.detach().numpy())
    np.testing.assert_array_equal(b, module.bias.detach().numpy())
