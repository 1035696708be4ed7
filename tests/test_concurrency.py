"""Two engine calls at once never see each other's weights, activations or dense reference."""
import threading

import numpy as np
import pytest
import torch

from sparsity_app import Spec, proxies, run
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
    after = model._hf[0].state_dict()
    assert all(torch.equal(shared[k], after[k]) for k in shared), "the shared model was modified"
    proxies._dense_embeddings.cache_clear()
    np.testing.assert_allclose(proxies._dense_embeddings("minilm-l6"), dense_before, rtol=0, atol=1e-6)
