"""Two engine calls at once never see each other's weights, activations or dense reference."""
import pathlib
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

from sparsity_app import Spec, run
from sparsity_app.accuracy import proxies
from sparsity_app.measure import locks
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import mask_of
from sparsity_app.runs import resolve

SPECS = [Spec(layer="encoder.layer.1.intermediate.dense", method="block", block=(16, 1), sparsity=0.8, tokens=16,
              repeat=3),
         Spec(layer="encoder.layer.4.attention.self.value", method="magnitude", sparsity=0.95, tokens=8, repeat=3)]


def test_two_runs_in_threads_get_what_each_gets_alone(cache_dir):
    model = get_model("minilm-l6")
    shared = {k: v.clone() for k, v in model._hf[0].state_dict().items()}
    dense_before = proxies._dense_embeddings("minilm-l6").copy()
    alone = [(run(s), mask_of(resolve.spec(s))) for s in SPECS]  # no store: each is measured afresh

    together, errors = [None, None], []

    def work(i):
        try:
            together[i] = (run(SPECS[i]), mask_of(resolve.spec(SPECS[i])))
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
    spans = sorted((h["start"], h["end"]) for h in locks.holds())
    assert len(spans) == 4 and all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), \
        "two measurements overlapped"
    after = model._hf[0].state_dict()
    assert all(torch.equal(shared[k], after[k]) for k in shared), "the shared model was modified"
    proxies._dense_embeddings.cache_clear()
    np.testing.assert_allclose(proxies._dense_embeddings("minilm-l6"), dense_before, rtol=0, atol=1e-6)


def test_waiters_are_served_in_ticket_order_told_their_place_and_dead_tickets_ignored(lock_dir):
    queue = lock_dir / "queue"
    queue.mkdir(parents=True)
    (queue / "00000000000000000001-999999999-1.ticket").write_text("killed long ago")  # no such pid
    holding, release, served, seen = threading.Event(), threading.Event(), [], {}

    def first():
        with locks.measurement_slot("first"):
            holding.set()
            release.wait(30)

    def waiter(name):
        with locks.measurement_slot(name, waiting=lambda ahead: seen.setdefault(name, set()).add(ahead)):
            served.append(name)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert holding.wait(30)
    for name in ("second", "third"):  # tickets taken in this order
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 30
        while name not in seen:
            assert time.monotonic() < deadline and threads[-1].is_alive(), f"{name} never queued"
            time.sleep(0.05)
    release.set()
    for t in threads:
        t.join(30)
    assert served == ["second", "third"]
    assert seen["second"] == {1} and 2 in seen["third"]  # the live holder (and second) ahead; not the dead ticket
    hold = locks.holds()
    assert [h["who"] for h in hold] == ["first", "second", "third"]
    assert all(a["end"] <= b["start"] for a, b in zip(hold, hold[1:]))
    assert locks.queue_length() == 0 and not list(queue.iterdir())  # the dead ticket was removed


def test_one_slot_whatever_the_cache_directory(tmp_path, monkeypatch):
    """The app on cache/ and a CLI run on --cache-dir elsewhere queue in the machine's one slot."""
    from sparsity_app.core.store import Store

    spec = Spec(model="bert-base-synthetic", block=(16, 1), sparsity=0.9, tokens=8, repeat=3)
    for name in ("a", "b"):
        run(spec, store=Store(tmp_path / name))
    assert [h["who"].startswith("run ") for h in locks.holds()] == [True, True]  # both in one log, one queue
    monkeypatch.delenv("SPARSITY_APP_LOCK_DIR")
    assert locks.lock_dir() == pathlib.Path(tempfile.gettempdir()) / "sparsity-app-measure"
