"""Two engine calls at once never see each other's weights, activations or dense reference."""
import threading

import numpy as np
import pytest
import torch

from sparsity_app import Spec, locks, proxies, run
from sparsity_app.experiment import mask_of
from sparsity_app.models import get_model

SPECS = [Spec(layer="encoder.layer.1.intermediate.dense", method="block", block=(16, 1), sparsity=0.8, tokens=16,
              repeat=3),
         Spec(layer="encoder.layer.4.attention.self.value", method="magnitude", sparsity=0.95, tokens=8, repeat=3)]


def test_two_runs_in_threads_get_what_each_gets_alone(cache_dir):
    model = get_model("minilm-l6")
    shared = {k: v.clone() for k, v in model._hf[0].state_dict().items()}
    dense_before = proxies._dense_embeddings("minilm-l6").copy()
    alone = [(run(s), mask_of(s)) for s in SPECS]  # no store: each is measured afresh

    together, errors = [None, None], []

    def work(i):
        try:
            together[i] = (run(SPECS[i]), mask_of(SPECS[i]))
        except Exception as e:  # surfaced below, with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for (a, mask_a), (b, mask_b) in zip(alone, together):
        assert b.spec == a.spec and b.sparsity_achieved == a.sparsity_achieved and b.stored_blocks == a.stored_blocks
        assert b.proxies == pytest.approx(a.proxies, rel=1e-6, abs=1e-7)
        np.testing.assert_array_equal(mask_b, mask_a)
    spans = sorted((h["start"], h["end"]) for h in locks.holds(cache_dir))
    assert len(spans) == 4 and all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), \
        "two measurements overlapped"
    after = model._hf[0].state_dict()
    assert all(torch.equal(shared[k], after[k]) for k in shared), "the shared model was modified"
    proxies._dense_embeddings.cache_clear()
    np.testing.assert_allclose(proxies._dense_embeddings("minilm-l6"), dense_before, rtol=0, atol=1e-6)


def test_a_waiter_is_told_its_place_and_a_dead_ticket_is_ignored(tmp_path):
    (tmp_path / "queue").mkdir()
    (tmp_path / "queue" / "00000000000000000001-999999999-1.ticket").write_text("killed long ago")  # no such pid
    holding, release, seen = threading.Event(), threading.Event(), []

    def first():
        with locks.measurement_slot(tmp_path, "first"):
            holding.set()
            release.wait(30)

    t = threading.Thread(target=first)
    t.start()
    holding.wait(30)
    def second():
        with locks.measurement_slot(tmp_path, "second", waiting=seen.append):
            pass

    waiter = threading.Thread(target=second)
    waiter.start()
    while not seen:
        waiter.join(0.1)
    release.set()
    t.join(30)
    waiter.join(30)
    assert set(seen) == {1}  # only the live holder is ahead; the dead ticket is not counted
    hold = locks.holds(tmp_path)
    assert [h["who"] for h in hold] == ["first", "second"] and hold[0]["end"] <= hold[1]["start"]
    assert locks.queue_length(tmp_path) == 0 and not list((tmp_path / "queue").iterdir())  # dead ticket removed
