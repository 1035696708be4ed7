"""Whole-model dense peers: same output as eager, clear errors, the shared model untouched."""
import numpy as np
import pytest
import torch

from sparsity_app.accuracy import metrics
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import default_threads
from sparsity_app.model import baselines, hf as model_hf
from sparsity_app.model.catalog import get_model


@pytest.fixture(scope="module")
def minilm():
    return get_model("minilm-l6")._hf


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_example_inputs_are_real_text_padded_to_seq(minilm):
    tok = minilm[1]
    ids, mask = baselines.example_inputs(tok, 3, 64)
    assert ids.shape == mask.shape == (3, 64) and ids.dtype == mask.dtype == np.int64
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert len(np.unique(ids)) > 50  # real, varied tokens, not a constant fill
    long_ids, long_mask = baselines.example_inputs(tok, 60, 256)
    assert long_mask[:, 0].all() and not long_mask.all()  # short polarity rows are padded
    assert (long_ids[long_mask == 0] == tok.pad_token_id).all()
    assert mask[0].all() and ids[0, -1] == tok.sep_token_id  # a long Lee document, truncated
    assert np.array_equal(ids[0, :-1], long_ids[0, :63])  # ... to the same text


def test_eager_matches_the_models_own_forward(minilm):
    hf, tok = minilm
    ids, mask = baselines.example_inputs(tok, 2, 32)
    with torch.inference_mode():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    out = baselines.torch_eager(hf, 2, 32)()
    assert out.shape == (2, 32, 384)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("batch, seq", [(2, 48), (1, 128)])
def test_onnxruntime_matches_eager_and_leaves_the_model_alone(minilm, batch, seq):
    hf, _ = minilm
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    run = baselines.onnxruntime_session(hf, batch, seq, threads=1)
    out = run()
    assert out.shape == (batch, seq, 384) and out.dtype == np.float32
    assert _rel(out, baselines.torch_eager(hf, batch, seq)().numpy()) <= 1e-4
    assert np.array_equal(run(), out)  # fixed inputs: every call the same
    assert not hf.training  # the exporter toggles train/eval on what it is given: a copy
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())


def test_onnxruntime_runs_the_pruned_weights(minilm):
    hf, _ = minilm
    layer = "encoder.layer.0.intermediate.dense"
    w = hf.get_submodule(layer).weight.detach().numpy()
    pruned = model_hf.masked_copy(hf, {layer: np.where(np.abs(w) > np.median(np.abs(w)), w, 0)})
    run = baselines.onnxruntime_session(pruned, 2, 32, threads=1)
    dense_out = baselines.torch_eager(hf, 2, 32)().numpy()
    assert _rel(run(), baselines.torch_eager(pruned, 2, 32)().numpy()) <= 1e-4
    assert _rel(run(), dense_out) > 1e-3  # really the pruned model, not the dense one


def test_an_export_that_disagrees_with_eager_is_refused(minilm, monkeypatch):
    hf, _ = minilm
    layer = "encoder.layer.0.attention.self.value"
    other = model_hf.masked_copy(hf, {layer: np.zeros((384, 384), np.float32)})
    real_export = baselines._export
    monkeypatch.setattr(baselines, "_export", lambda model, ids, mask, path: real_export(other, ids, mask, path))
    with pytest.raises(RuntimeError, match="differs from PyTorch eager"):
        baselines.onnxruntime_session(hf, 1, 16, threads=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0}, "threads must be between 1 and"),
    ({"threads": default_threads() + 1}, "threads must be between 1 and"),
    ({"threads": 1.5}, "threads must be between 1 and"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"batch": 2.0}, "batch must be a positive integer"),
    ({"seq": 1}, "seq must be an integer between 2 and 512"),
    ({"seq": 513}, "seq must be an integer between 2 and 512"),
])
def test_bad_requests_get_one_line_errors(minilm, kwargs, message):
    args = {"batch": 1, "seq": 16, "threads": 1} | kwargs
    with pytest.raises(UserError, match=message):
        baselines.onnxruntime_session(minilm[0], **args)
    if "threads" not in kwargs:
        with pytest.raises(UserError, match=message):
            baselines.torch_eager(minilm[0], args["batch"], args["seq"])


def test_a_model_in_training_mode_is_refused(minilm):
    training = model_hf.masked_copy(minilm[0], {}).train()
    with pytest.raises(UserError, match="training mode"):
        baselines.torch_eager(training, 1, 16)
    with pytest.raises(UserError, match="training mode"):
        baselines.onnxruntime_session(training, 1, 16, threads=1)


@pytest.mark.parametrize("batch, seq, message", [(0, 16, "batch"), (1, 1, "seq"), (1, "16", "seq")])
def test_example_inputs_refuse_bad_shapes(minilm, batch, seq, message):
    with pytest.raises(UserError, match=message):
        baselines.example_inputs(minilm[1], batch, seq)
