"""INT8: the quantization, the kernels against the NumPy reference of the same arithmetic (to the bit),
what resolve refuses, and a layer run with its INT8 peers."""
import dataclasses

import numpy as np
import pytest
import tvm

from sparsity_app import Spec, UserError
from sparsity_app.accuracy.proxies import output_error
from sparsity_app.core.results import INT8_PEERS, SPARSE
from sparsity_app.kernels import Kernel, host_isa, int8
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import pruned_layer
from sparsity_app.prune.quantize import LEVELS, int8_linear, int8_misfit, quantize_rows, quantize_tokens, to_quantized_bsr
from sparsity_app.runs import resolve
from sparsity_app.runs.layer import run

pytestmark = pytest.mark.skipif(host_isa().int8_dot is None, reason="no integer dot on this CPU (needs AVX2)")


def _case(out_f, in_f, tokens, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((out_f, in_f)).astype(np.float32), rng.standard_normal((tokens, in_f)).astype(np.float32)


def test_quantization_round_trips_within_half_a_step_and_keeps_zeros():
    w, x = _case(24, 32, 5)
    w[3] = 0.0  # a row pruned away entirely: scale 0, codes 0, no division by zero
    w[5, ::2] = 0.0
    q = quantize_rows(w)
    assert q.codes.dtype == np.int8 and np.abs(q.codes).max() <= 127
    assert (q.codes[w == 0] == 0).all() and q.scales[3] == 0
    assert np.all(np.abs(q.dequantized() - w) <= q.scales[:, None] / 2 + 1e-7)
    for dot, (levels, offset) in LEVELS.items():
        x[2] = 0.0  # a token of zeros: scale 0, codes at the offset
        codes, scales = quantize_tokens(x, levels, offset)
        assert codes.min() >= offset - levels and codes.max() <= offset + levels and (codes[2] == offset).all()
        assert np.all(np.abs((codes.astype(np.int32) - offset) * scales[:, None] - x) <= scales[:, None] / 2 + 1e-6)
    assert LEVELS["avx2"] == (63, 64)  # 7-bit activations: a u8 x s8 pair stays below int16's 32767
    assert 2 * (63 + 64) * 127 < 32767


@pytest.mark.parametrize("tokens", [1, 5, 27, 128])
def test_dense_int8_kernel_is_the_reference_to_the_bit(tokens):
    w, x = _case(48, 96, tokens, seed=tokens)
    y = int8.TVMDenseInt8(w, x).output()
    np.testing.assert_array_equal(y, int8_linear(x, quantize_rows(w), int8.host_dot()))
    graph_layout = int8.pick_dense_knobs(tokens, 48, int8.host_dot(), "feature-major")  # X^T in, Y^T out
    np.testing.assert_array_equal(int8.TVMDenseInt8(w, x, graph_layout).output(), y)
    dense = x.astype(np.float64) @ w.astype(np.float64).T  # and it is the same linear, within quantization noise
    assert np.abs(y - dense).max() / np.abs(dense).max() < 0.05


@pytest.mark.parametrize("block", [(16, 4), (8, 4), (32, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("tokens", [3, 27])
def test_bsr_int8_every_schedule_is_the_reference_to_the_bit(block, tokens):
    """Every candidate and variant the tuner may pick, with an empty block row and fewer tokens than a
    vector of tokens (vec="tokens" pads them)."""
    w, x = _case(block[0] * 4, block[1] * 8, tokens, seed=sum(block))
    rng = np.random.default_rng(1)
    mask = np.kron(rng.random((4, 8)) < 0.4, np.ones(block, bool))
    mask[: block[0]] = False
    weight = to_quantized_bsr(w, mask, block)
    want = int8_linear(x, weight.rows(), int8.host_dot())
    first = int8.candidates(tokens, weight)
    for knobs in dict.fromkeys([*first, *(v for k in first for v in int8.variants(k, weight))]):
        np.testing.assert_array_equal(Kernel(int8.pack(weight, tokens, knobs)).bind(x).output(), want,
                                      err_msg=knobs.label())


def test_the_vnni_kernel_compiles_for_an_avx512_vnni_target():
    """This machine may not run vpdpbusd (an AVX2 Zen 3 cannot); LLVM still builds it for one that does."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    func = int8.bsr_int8_prim_func(16, (32, 16), (16, 4), 2, int8.Int8Knobs(4, "rows"), 1, "vnni")
    tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=target)
    func = int8.dense_int8_prim_func(16, 32, 16, int8.DenseInt8Knobs(32, 8), "vnni")
    tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=target)


def test_patterns_the_int8_kernels_cannot_run_are_refused_in_one_line():
    assert int8_misfit((16, 4), None) is None and int8_misfit((1, 8), None) is None
    for spec in (Spec(block=(32, 1), precision="int8"), Spec(method="nm", nm=(2, 4), precision="int8"),
                 Spec(method="magnitude", precision="int8"), Spec(precision="fp16")):
        with pytest.raises(UserError) as e:
            resolve.layer(spec)
        assert "\n" not in str(e.value) and ("INT8" in str(e.value) or "precision" in str(e.value))
    assert resolve.layer(Spec(block=(16, 4), precision="int8")).spec.label() == "block 16x4 int8"


def test_an_int8_layer_run_meets_dense_int8_peers_and_scores_the_quantized_layer(tmp_path):
    from sparsity_app.core.store import Store

    spec = Spec(block=(16, 4), sparsity=0.8, tokens=16, repeat=3, precision="int8")
    result = run(spec, store=Store(tmp_path))
    assert set(INT8_PEERS) <= set(result.times_ms) and result.kernel["format"] == "bsr_int8"
    assert result.backend["max_rel_error"][SPARSE] == 0.0 and result.backend["max_rel_error"]["tvm_dense_int8"] == 0.0
    assert result.times_ms[result.best_dense].median == min(t.median for k, t in result.times_ms.items() if k != SPARSE)
    # the quantized layer is scored as it runs: a little further from dense than the same mask in fp32
    model = get_model(spec.model)
    (weight, bias), (_, pruned) = model.weight(spec.layer), pruned_layer(resolve.spec(dataclasses.replace(spec, precision="fp32")))
    _, fp32_cosine = output_error(model.calibration_set(spec.layer), weight, pruned, bias)
    assert 0 < fp32_cosine - result.proxies["output_cosine"] < 0.05
    assert result.to_dict()["precision"] == "int8" and type(result).from_dict(result.to_dict()).spec == result.spec


def test_an_int8_graph_matches_its_int8_pytorch_reference():
    """Sparse INT8 (both layouts, both vectorised axes), dense INT8 and float32 linears in one compiled
    encoder, against PyTorch with each INT8 linear computed by the INT8 arithmetic (graph.reference_model);
    a small model, so the rounding cascade of `graph.tolerance` stays small here (measured ~1e-6)."""
    from sparsity_app.model import graph

    model = graph.synthetic_bert(layers=2, hidden=64, heads=4, intermediate=128, seed=3)
    names = [f"encoder.layer.{i}.{sub}" for i in range(2) for sub in graph.SUBLAYERS]
    knobs = [int8.Int8Knobs(4, "rows", layout="feature-major"), int8.Int8Knobs(16, "tokens", layout="feature-major"),
             int8.Int8Knobs(8, "rows"), int8.Int8Knobs(16, "tokens", rows_per_pass=8)]
    rng, plans = np.random.default_rng(0), {}
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        w, b = module.weight.detach().numpy(), module.bias.detach().numpy()
        if i % 3 == 2:
            plans[name] = graph.dense_linear(w, b, "int8")
        elif i % 3 == 1:
            mask = np.kron(rng.random((w.shape[0] // 16, w.shape[1] // 4)) < 0.4, np.ones((16, 4), bool))
            plans[name] = graph.LinearPlan("bsr_int8", to_quantized_bsr(w, mask, (16, 4)), b, knobs[i % len(knobs)])
    ids = rng.integers(0, model.config.vocab_size, (2, 16))
    mask = np.ones((2, 16), np.int64)
    encoder = graph.compile_encoder(model, model, plans, 2, 16)
    assert graph.verify(encoder, graph.reference_model(model, plans), ids, mask, 1e-3) <= 1e-3
    float_weights = graph.reference_model(model, {n: graph.LinearPlan("dense", p.dense_weight(), p.bias)
                                                  for n, p in plans.items()})  # INT8 is not float32: it moved
    assert graph.verify(encoder, float_weights, ids, mask, 1.0) > 1e-4


def test_learn_ranks_blocks_per_precision_against_dense_of_that_precision():
    import pandas as pd

    from sparsity_app.serve.analysis import best_block_per_precision

    rows = [("fp32", "block 32x1", 0.95), ("fp32", "block 32x1", 0.9), ("fp32", "block 1x32", 0.5),
            ("int8", "block 16x4 int8", 0.6), ("int8", "block 32x4 int8", 0.7), ("int8", "block 32x4 int8", 0.65),
            ("int8", "block 1x4 int8", 0.9)]
    df = pd.DataFrame([{"precision": p, "pattern": pat, "fraction_of_ideal_same_precision": f, "sparsity_achieved": 0.9,
                        "noisy": pat == "block 1x4 int8"} for p, pat, f in rows])  # the noisy point makes no verdict
    table = best_block_per_precision(df)
    best = table[table["best"] == "best"].set_index("precision")["pattern"].to_dict()
    assert best == {"fp32": "block 32x1", "int8": "block 32x4 int8"}
    assert "block 1x4 int8" not in set(table["pattern"])
    single = best_block_per_precision(df[df["pattern"] != "block 32x4 int8"])
    assert single[single["precision"] == "int8"]["best"].iloc[0] == "one point: no verdict"


def test_stacked_int8_weights_compute_each_layer_to_the_bit():
    """Q, K and V stacked by rows run as one INT8 kernel (their input quantized once): the same rows, bits."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((19, 64)).astype(np.float32)
    parts = []
    for seed in range(3):
        w = np.random.default_rng(seed).standard_normal((32, 64)).astype(np.float32)
        parts.append(to_quantized_bsr(w, np.kron(rng.random((2, 16)) < 0.5, np.ones((16, 4), bool)), (16, 4)))
    stacked = int8.stack_rows(parts)
    knobs = int8.Int8Knobs(4, "rows", layout="feature-major")
    got = Kernel(int8.pack(stacked, 19, knobs)).bind(x).output()
    want = np.concatenate([Kernel(int8.pack(p, 19, knobs)).bind(x).output() for p in parts], axis=1)
    np.testing.assert_array_equal(got, want)
    assert int8.stack_rows([parts[0], to_quantized_bsr(parts[1].rows().dequantized(), np.ones((32, 64), bool), (8, 4))]) is None
