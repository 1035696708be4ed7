"""The whole encoder as one TVM executable against PyTorch with the same weights (no timing here)."""
import numpy as np
import pytest
import torch

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import Spec
from sparsity_app.core.results import amdahl_bound
from sparsity_app.kernels.bsr import BSRKnobs
from sparsity_app.kernels.csr import CSRKnobs
from sparsity_app.kernels.dense import DenseFMKnobs
from sparsity_app.kernels.nm import NMKnobs
from sparsity_app.model import baselines, graph
from sparsity_app.measure.tuner import sparse_format
from sparsity_app.prune.methods import prune
from sparsity_app.runs import resolve


@pytest.fixture(scope="module")
def small():
    """A 2-layer BERT (hidden 64, 4 heads, intermediate 128) with seeded random weights."""
    return graph.synthetic_bert(layers=2, hidden=64, heads=4, intermediate=128, seed=3)


def _inputs(batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq - seq // 3:] = 0  # padding at the end of the last sequence
    return ids, mask


def _plan(model, name, spec, knobs=None):
    mod = model.get_submodule(name)
    w, b = mod.weight.detach().numpy(), mod.bias.detach().numpy()
    family, fmt = sparse_format(w, prune(w, resolve.spec(spec)), resolve.spec(spec))
    return graph.LinearPlan(family, fmt, b, knobs)


@pytest.mark.parametrize("batch,seq", [(2, 16), (1, 13), (1, 100), (2, 256)])  # 100: overlapping tiles; 512 tokens: padded stride
@pytest.mark.parametrize("fuse_attention", [True, False])
def test_dense_graph_matches_pytorch(small, batch, seq, fuse_attention):
    enc = graph.compile_encoder(small, small, {}, batch, seq, fuse_attention=fuse_attention)
    ids, mask = _inputs(batch, seq, small.config.vocab_size)
    assert graph.verify(enc, small, ids, mask) <= 1e-4
    assert enc(ids, mask).shape == (batch, seq, 64)


def test_mixed_sparse_graph_matches_masked_pytorch(small):
    """BSR (both layouts, both vectorised axes), CSR (packed and not), N:M and dense layers in one graph."""
    block = Spec(method="block", block=(16, 1), sparsity=0.75)
    flat = Spec(method="block", block=(1, 8), sparsity=0.5)
    mag = Spec(method="magnitude", block=(1, 1), sparsity=0.8)
    nm24 = Spec(method="nm", nm=(2, 4))
    layer = "encoder.layer.{}.{}"
    plans = {
        layer.format(0, "attention.self.query"): _plan(small, layer.format(0, "attention.self.query"), block,
                                                       BSRKnobs(tile=8, vec="rows", layout="row-major")),
        layer.format(0, "attention.self.key"): _plan(small, layer.format(0, "attention.self.key"), block,
                                                     BSRKnobs(tile=16, vec="tokens", layout="feature-major", split="nnz")),
        layer.format(0, "attention.self.value"): _plan(small, layer.format(0, "attention.self.value"), mag,
                                                       CSRKnobs(tile=8, pack=True)),
        layer.format(0, "attention.output.dense"): _plan(small, layer.format(0, "attention.output.dense"), nm24,
                                                         NMKnobs(tile=16, chunk=16)),
        layer.format(0, "intermediate.dense"): _plan(small, layer.format(0, "intermediate.dense"), flat,
                                                     BSRKnobs(tile=16, vec="tokens", layout="feature-major", rows_per_pass=0)),
        layer.format(0, "output.dense"): _plan(small, layer.format(0, "output.dense"), mag),
        # layer 1: Q, K, V with one plan each of the same kind -> fused into one linear
        **{layer.format(1, s): _plan(small, layer.format(1, s), block, BSRKnobs(tile=8, layout="feature-major"))
           for s in ("attention.self.query", "attention.self.key", "attention.self.value")},
        layer.format(1, "intermediate.dense"): graph.LinearPlan(
            "dense", small.get_submodule(layer.format(1, "intermediate.dense")).weight.detach().numpy(), None,
            DenseFMKnobs(mr=4, nt=16)),
    }
    ref = graph.reference_model(small, plans)
    # 27 tokens: every tile (8, 16) overlaps its neighbour at the end; 512 tokens: padded stride
    for batch, seq, fuse_qkv in [(1, 27, True), (2, 24, False), (2, 256, True)]:
        ids, mask = _inputs(batch, seq, small.config.vocab_size, seed=1)
        enc = graph.compile_encoder(small, small, plans, batch, seq, fuse_qkv=fuse_qkv)
        assert graph.verify(enc, ref, ids, mask) <= 1e-4
    # the pruned weights matter: the unpruned model gives another answer
    assert not np.allclose(graph.torch_forward(small, ids, mask), enc(ids, mask), atol=1e-3)
    # the shared model was not modified by building the reference
    w = small.get_submodule(layer.format(0, "output.dense")).weight.detach().numpy()
    assert (w != 0).all()


def test_minilm_90_percent_32x1_matches_pytorch():
    from sparsity_app.model.catalog import get_model

    hf, tok = get_model("minilm-l6")._hf
    spec = Spec(method="block", block=(32, 1), sparsity=0.9)
    knobs = BSRKnobs(tile=16, vec="tokens", layout="feature-major", split="nnz", rows_per_pass=16)
    plans = {n: _plan(hf, n, spec, knobs) for n in graph.EncoderShape.of(hf).linear_names()}
    ids, mask = baselines.example_inputs(tok, 2, 16)
    enc = graph.compile_encoder(hf, hf, plans, 2, 16)
    assert graph.verify(enc, graph.reference_model(hf, plans), ids, mask) <= 1e-4


def test_verify_raises_on_a_wrong_model(small):
    enc = graph.compile_encoder(small, small, {}, 1, 8)
    other = graph.synthetic_bert(layers=2, hidden=64, heads=4, intermediate=128, seed=4)
    with pytest.raises(RuntimeError, match="disagrees"):
        graph.verify(enc, other, *_inputs(1, 8, small.config.vocab_size))


def test_breakdown_groups_present_and_positive():
    """On one MiniLM-sized layer: kernels of 10-300 us at 128 tokens, and of a few us at 16 (where
    subtracting the whole callback's cost per call once drove linears to zero)."""
    model = graph.synthetic_bert(layers=1, hidden=384, heads=12, intermediate=1536, seed=5)
    for fuse_attention, seq in ((False, 128), (True, 128), (False, 16)):  # fused: broken down on its split twin
        enc = graph.compile_encoder(model, model, {}, 1, seq, fuse_attention=fuse_attention)
        enc.set_inputs(*_inputs(1, seq, model.config.vocab_size))
        bd = enc.breakdown(repeat=3)
        assert set(bd) == set(graph.GROUPS)
        assert all(bd[g] > 0 for g in graph.GROUPS if g != "other"), bd
        assert bd["other"] >= 0  # the pass's time not in any kernel
        assert amdahl_bound(bd) > 1 and amdahl_bound({**bd, "linears": 0.0}) == 1.0
        times = enc.linear_times()  # each linear's share of the passes, by layer
        assert set(times) == set(graph.EncoderShape.of(model).linear_names()) and all(v > 0 for v in times.values())


def test_breakdown_keeps_sub_microsecond_kernels(small):
    """In a toy model every kernel is shorter than the instrument's callback (~3-7 us a call);
    only the part of it inside each call's window is taken off, so no operator reads zero
    (subtracting the whole callback zeroed softmax, layer norm and GELU on every run)."""
    enc = graph.compile_encoder(small, small, {}, 1, 8)
    enc.set_inputs(*_inputs(1, 8, small.config.vocab_size))
    bd = enc.breakdown(repeat=5)
    assert all(bd[g] > 0 for g in graph.GROUPS), bd  # "other": the VM's own work, a large share here
    assert all(v > 0 for v in enc.linear_times().values()), enc.linear_times()


def test_bad_inputs_are_one_line_errors(small):
    enc = graph.compile_encoder(small, small, {}, 2, 8)
    ids, mask = _inputs(2, 8, small.config.vocab_size)
    with pytest.raises(UserError, match="shape"):
        enc(ids[:1], mask[:1])
    with pytest.raises(UserError, match="integers"):
        enc(ids.astype(np.float32), mask)
    with pytest.raises(UserError, match="input_ids must be in"):
        enc(ids + 10_000, mask)
    assert enc(torch.as_tensor(ids), torch.as_tensor(mask)).shape == (2, 8, 64)  # torch inputs are fine
    with pytest.raises(UserError, match="unknown linear"):
        graph.compile_encoder(small, small, {"encoder.layer.9.output.dense": None}, 1, 8)
    w = np.zeros((64, 64), np.float32)
    with pytest.raises(UserError, match="must have shape"):
        graph.compile_encoder(small, small, {"encoder.layer.0.intermediate.dense": graph.LinearPlan("dense", w, None)}, 1, 8)
    from sparsity_app.kernels.dense import DenseKnobs

    with pytest.raises(UserError, match="DenseFMKnobs"):
        graph.compile_encoder(small, small, {"encoder.layer.0.attention.output.dense": graph.LinearPlan(
            "dense", w, None, DenseKnobs())}, 1, 8)
    with pytest.raises(UserError, match="valid families"):
        graph.LinearPlan("coo", w, None)
    with pytest.raises(UserError, match="seq"):
        graph.compile_encoder(small, small, {}, 1, 10_000)


def test_tuner_can_be_held_to_feature_major_schedules():
    """The graph keeps activations feature-major, so it tunes with layouts=("feature-major",)."""
    from sparsity_app.measure import tuner
    from sparsity_app.prune.formats import to_bsr

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    mask = prune(w, resolve.spec(Spec(method="block", block=(32, 1), sparsity=0.5)))
    x = rng.standard_normal((16, 32)).astype(np.float32)
    ref = x.astype(np.float64) @ (w * mask).astype(np.float64).T
    t = tuner.tune("bsr", to_bsr(w, mask, (32, 1)), x, ref, layouts=("feature-major",))
    assert t.knobs().layout == "feature-major"
    assert any(r["knobs"]["layout"] == "row-major" for r in t.trials)  # the default was timed, not allowed to win
    with pytest.raises(ValueError, match="no bsr schedule"):
        tuner.tune("bsr", to_bsr(w, mask, (32, 1)), x, ref, layouts=("column-major",))


def test_one_bucketed_encoder_serves_every_length_exactly():
    """Executables at a few lengths, each input padded inside to the next: the real tokens' outputs are
    PyTorch's on the unpadded input, at every length up to the largest bucket (and not beyond)."""
    from sparsity_app.model.buckets import BucketedEncoder, default_buckets

    assert default_buckets(1) == [8] and default_buckets(100) == [8, 12, 16, 24, 32, 48, 64, 96, 128]
    model = graph.synthetic_bert(layers=1, hidden=64, heads=4, intermediate=128, seed=6)
    compiled = []
    encoder = BucketedEncoder([8, 12], 2, lambda seq: compiled.append(seq) or graph.compile_encoder(model, model, {}, 2, seq))
    for seq in (2, 5, 8, 11, 12):
        ids, mask = _inputs(2, seq, model.config.vocab_size, seed=seq)
        want = graph.torch_forward(model, ids, mask)
        np.testing.assert_allclose(encoder(ids, mask), want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert compiled == [8, 12]  # each bucket compiled once, on first use
    with pytest.raises(UserError, match="longer than the largest bucket, 12"):
        encoder(*_inputs(2, 13, model.config.vocab_size))
    with pytest.raises(UserError, match=r"must be \[2, seq\]"):
        encoder(*_inputs(1, 8, model.config.vocab_size))
