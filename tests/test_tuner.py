"""The schedule tuner: picks among its candidates, stores the winner, never lets a wrong kernel win."""
import dataclasses

import numpy as np
import pytest

from sparsity_app.core.requests import Spec
from sparsity_app.core.store import Store
from sparsity_app.measure import tuner
from sparsity_app.measure.tuner import sparse_format
from sparsity_app.prune.methods import prune
from sparsity_app.runs import resolve


def _case(spec: Spec, shape=(64, 96), tokens=32):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape, dtype=np.float32)
    x = rng.standard_normal((tokens, shape[1]), dtype=np.float32)
    mask = prune(w, spec)
    family, weight = sparse_format(w, mask, spec)
    return family, weight, x, x.astype(np.float64) @ (w * mask).astype(np.float64).T


@pytest.mark.parametrize("spec", [Spec(block=(16, 1), sparsity=0.9), Spec(block=(1, 1), method="magnitude"),
                                  Spec(method="nm", nm=(2, 4))], ids=lambda s: s.label())
def test_tune_reports_every_trial_and_the_winner(spec):
    spec = resolve.spec(spec)
    family, weight, x, ref = _case(spec)
    t = tuner.tune(family, weight, x, ref)
    fam = tuner.families()[family]
    assert t.family == family == {"block": "bsr", "magnitude": "csr", "nm": "nm"}[spec.method]
    labels = [r["label"] for r in t.trials]
    assert len(labels) == len(set(labels)) >= 3
    assert t.trials[0]["knobs"] == t.winner and t.trials[0]["median_ms"] == t.best_ms
    assert [r["median_ms"] for r in t.trials] == sorted(r["median_ms"] for r in t.trials)
    assert fam.default(x.shape[0], weight).label() in labels
    assert t.gain == pytest.approx(t.default_ms / t.best_ms)
    assert isinstance(t.knobs(), fam.knobs) and t.knobs().label() == t.label


def test_best_schedule_is_stored_per_bucket_and_never_tuned_twice(tmp_path, monkeypatch):
    store = Store(tmp_path)
    spec = resolve.spec(Spec(block=(8, 1), sparsity=0.9))
    family, weight, x, ref = _case(spec)
    first = tuner.best_schedule(family, weight, x, ref, spec, 2, store)
    assert not first.cached and tuner.is_tuned(family, weight, x, spec, 2, store)
    monkeypatch.setattr(tuner, "tune", lambda *a: pytest.fail("tuned twice"))
    again = tuner.best_schedule(family, weight, x, ref, spec, 2, Store(tmp_path))  # a new process, same disk
    assert again.cached and again.winner == first.winner and again.trials == first.trials
    assert not tuner.is_tuned(family, weight, x, spec, 1, store)  # other thread count: its own winner
    other = resolve.spec(Spec(block=(8, 1), sparsity=0.5))
    assert not tuner.is_tuned(*_case(other)[:3], other, 2, store)


def test_a_kernel_with_a_wrong_answer_never_wins(monkeypatch):
    spec = resolve.spec(Spec(block=(16, 1), sparsity=0.5))
    family, weight, x, ref = _case(spec)
    real = tuner.families()
    fam = real[family]

    def broken_pack(weight, tokens, knobs, n_parts=None):  # one schedule computes with doubled weights
        packed = fam.pack(weight, tokens, knobs, n_parts)
        if knobs.split != "rows*tokens":
            return packed
        return dataclasses.replace(packed, weights=(packed.weights[0] * 2, *packed.weights[1:]))

    broken = dataclasses.replace(fam, pack=broken_pack, candidates=lambda tokens, w: [
        dataclasses.replace(fam.default(tokens, w), split="rows*tokens")])  # fast, and wrong
    monkeypatch.setattr(tuner, "families", lambda: {**real, family: broken})
    with pytest.raises(RuntimeError, match="disagrees with NumPy"):
        tuner.tune(family, weight, x, ref)
