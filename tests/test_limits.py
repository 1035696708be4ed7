"""Each limit stops what it should, says which limit and its value, and is set by its variable."""
import dataclasses
import pathlib
import time

import pytest
from streamlit.testing.v1 import AppTest

from sparsity_app import Spec, run
from sparsity_app.accuracy.proxies import PROXIES
from sparsity_app.cli.main import main
from sparsity_app.core.limits import (LimitExceeded, Limits, MeasurementTimeout, RateLimiter, check_time, env_name,
                                      time_limit)
from sparsity_app.core.store import Store
from sparsity_app.measure import locks
from sparsity_app.measure.timing import measure
from sparsity_app.runs import resolve

APP = str(pathlib.Path(__file__).resolve().parent.parent / "app.py")
CHEAP = dict(model="bert-base-synthetic", layer="encoder.layer.0.attention.self.query", tokens=8, repeat=3)


def test_every_limit_is_read_from_its_variable_and_a_bad_value_is_one_clear_line():
    fields = [f.name for f in dataclasses.fields(Limits)]
    env = {env_name(name): "7" for name in fields}
    assert Limits.from_env(env) == Limits(**{name: 7 for name in fields})
    assert Limits.from_env({}) == Limits()  # hosted defaults
    assert env_name("max_tokens") == "SPARSITY_APP_MAX_TOKENS"
    for bad in ("lots", "-1", "nan", "2.5"):  # 2.5: max_tokens is a whole number
        with pytest.raises(ValueError, match=r"SPARSITY_APP_MAX_TOKENS must be a whole number >= 0"):
            Limits.from_env({"SPARSITY_APP_MAX_TOKENS": bad})


def test_sweep_size_limit_names_itself_in_the_cli(monkeypatch, cache_dir, capsys):
    monkeypatch.setenv("SPARSITY_APP_MAX_SWEEP_POINTS", "3")
    assert main(["sweep", "--model", "bert-base-synthetic", "--blocks", "32x1,4x4", "--sparsities", "0.8,0.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "at most 3 points" in err and "this sweep has 4" in err and "SPARSITY_APP_MAX_SWEEP_POINTS" in err
    assert "\n" not in err and not locks.holds()  # refused before measuring anything


def test_token_limit_refuses_a_run_before_it_measures(monkeypatch, cache_dir, capsys):
    monkeypatch.setenv("SPARSITY_APP_MAX_TOKENS", "64")
    with pytest.raises(LimitExceeded, match=r"at most 64 tokens.*asks for 128.*max_tokens=64.*SPARSITY_APP_MAX_TOKENS"):
        run(Spec(**{**CHEAP, "tokens": 128}), store=Store())
    assert main(["run", "--model", "bert-base-synthetic", "--tokens", "65"]) == 2
    assert "at most 64 tokens" in capsys.readouterr().err
    assert not locks.holds()


def test_rate_limit_counts_per_session_in_a_sliding_window():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limits = Limits(rate_measurements=3, rate_window_s=60)
    limiter.take("a", 2, limits)
    limiter.take("b", 3, limits)  # another session has its own budget
    with pytest.raises(LimitExceeded, match=r"at most 3 new measurements per 60 s.*needs 2, 2 started.*again in 60 s"):
        limiter.take("a", 2, limits)
    assert limiter.spent("a", limits) == 2  # a refused request counts nothing
    limiter.take("a", 1, limits)
    now[0] = 30.0
    with pytest.raises(LimitExceeded, match="SPARSITY_APP_RATE_MEASUREMENTS"):
        limiter.take("a", 1, limits)
    now[0] = 60.5  # the first two have left the window
    limiter.take("a", 2, limits)
    with pytest.raises(LimitExceeded, match="ask for fewer at a time"):
        limiter.take("c", 4, limits)
    limiter.take("c", 4, Limits(rate_measurements=0))  # 0 lifts the limit


def test_measurement_time_limit_stops_a_runaway_timing_between_samples():
    start = time.monotonic()
    with pytest.raises(MeasurementTimeout, match=r"at most 0.3 s.*before the next timed sample.*SPARSITY_APP_MEASURE"):
        with time_limit("measure_timeout_s", Limits(measure_timeout_s=0.3)):
            measure({"slow": lambda: time.sleep(0.01)}, repeat=10_000, warmup_s=0.0, settle_s=0.0)
    assert time.monotonic() - start < 2.0  # 10,000 samples would take minutes
    check_time("anything")  # outside the block no deadline is left behind
    with time_limit("measure_timeout_s", Limits(measure_timeout_s=0)):  # 0 = no limit
        time.sleep(0.01)
        check_time("anything")


def test_measurement_over_its_time_limit_is_stopped_stores_nothing_and_frees_the_slot(monkeypatch, cache_dir):
    from sparsity_app import kernels
    from sparsity_app.model.catalog import get_model

    get_model(CHEAP["model"]).calibration(CHEAP["layer"], CHEAP["tokens"])
    monkeypatch.setenv("SPARSITY_APP_MEASURE_TIMEOUT_S", "0.5")
    store = Store()
    start = time.monotonic()
    with pytest.raises(MeasurementTimeout, match=r"at most 0.5 s on this server; this one was stopped before") as e:
        run(Spec(**CHEAP, block=(16, 1), sparsity=0.7), store=store)  # a cold tuning alone takes seconds
    assert time.monotonic() - start < 5
    assert "nothing of it was stored" in str(e.value)
    assert len(store) == 0 and store.tunings() == 0
    assert locks.queue_length() == 0 and len(locks.holds()) == 1  # the slot was released


def test_cache_evicts_the_least_recently_used_result(monkeypatch, cache_dir):
    from test_figures import _result

    monkeypatch.setenv("SPARSITY_APP_CACHE_MB", "0.15")  # results get 2/3: ~100 KB, ~25 results
    store = Store()
    for i in range(80):
        store.put(f"r{i}", _result(0.5 + i / 200, 2.0))
        assert store.get("r0") is not None  # read after every write: the most recently used
    kept = {r.spec.sparsity for r in store.results()}
    assert 5 < len(kept) < 60  # bounded
    assert 0.5 in kept  # r0, stored first but used last, survived
    assert 0.5 + 1 / 200 not in kept  # r1, stored early and never read again, was evicted


def test_app_refuses_a_sweep_beyond_the_limits_and_measures_nothing(monkeypatch, cache_dir):
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page("app_pages/sweep.py").run()
    monkeypatch.setenv("SPARSITY_APP_MAX_SWEEP_POINTS", "3")
    at.button(key="FormSubmitter:sweep-Run sweep").click().run()  # the default grid: 20 points
    assert not at.exception
    assert any("at most 3 points" in e.value and "SPARSITY" in e.value for e in at.error)

    monkeypatch.setenv("SPARSITY_APP_MAX_SWEEP_POINTS", "0")
    monkeypatch.setenv("SPARSITY_APP_RATE_MEASUREMENTS", "5")
    at.button(key="FormSubmitter:sweep-Run sweep").click().run()
    assert not at.exception
    assert any("rate limit" in e.value and "needs 20" in e.value for e in at.error)
    assert not locks.holds() and len(Store()) == 0


def test_app_rate_limit_counts_new_measurements_only(monkeypatch, cache_dir):
    """The page's accounting, with the engine replaced by one that stores a result at once (the engine's
    own limits are tested above): a new measurement counts, a refused one is not run, a cached one is free."""
    from test_figures import _result

    import app_pages.common
    from sparsity_app.core.store import key_of
    from sparsity_app.measure.timing import fingerprint
    from sparsity_app.serve import analysis

    measured = []

    def engine(point, store, progress, retune, backend=None):  # as runs.layer.run: a stored result is returned
        spec = point.spec  # the page resolved it
        if not retune and (hit := store.get(key_of(spec, fingerprint()))) is not None:
            return hit
        measured.append(spec)
        result = dataclasses.replace(_result(spec.sparsity, 2.0), spec=spec, proxies=dict.fromkeys(PROXIES, 0.5))
        store.put(key_of(spec, fingerprint()), result)
        return result

    monkeypatch.setattr(app_pages.common, "run", engine)
    # A fresh limiter: the process-wide one has counted the runs of earlier AppTests, which share a session id.
    monkeypatch.setattr(app_pages.common, "RATE_LIMITER", RateLimiter())
    monkeypatch.setenv("SPARSITY_APP_RATE_MEASUREMENTS", "1")
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.button(key="FormSubmitter:explore-Run").click().run()  # the session's one new measurement
    assert not at.exception and not at.error and len(measured) == 1
    at.slider(key="sparsity").set_value(0.8)
    at.button(key="FormSubmitter:explore-Run").click().run()
    assert [e.value for e in at.error if "rate limit" in e.value and "at most 1 new" in e.value]
    assert len(measured) == 1  # refused before the engine was called
    at.slider(key="sparsity").set_value(0.9)
    at.button(key="FormSubmitter:explore-Run").click().run()  # stored: served, not counted
    assert not at.exception and not at.error and len(measured) == 1
    assert any("Loaded from the cache" in c.value for c in at.caption)


def test_recovered_weights_are_bounded_least_recently_used_first_and_a_live_checkpoint_stays(monkeypatch, cache_dir):
    import os

    import numpy as np

    from sparsity_app.core.requests import RecoveryRequest
    from sparsity_app.core.results import RecoveryResult

    monkeypatch.setenv("SPARSITY_APP_WEIGHTS_MB", "1")  # room for two of these (0.4 MB each), not three
    store = Store()
    metrics = {"lee_pearson": 0.5}
    weights = {"l": np.ones((320, 256), np.float32)}  # 320 KB + an 80 KB mask
    masks = {"l": np.ones((320, 256), bool)}

    def put(key: str) -> None:
        result = RecoveryResult(request=RecoveryRequest(), steps_done=1, wall_s=1.0, loss=[(1, 0.1)],
                                metrics_before=metrics, metrics_after=metrics, dense_metrics=metrics,
                                sparsity_achieved=0.5, resumed_from=0, eval_s=0.0, machine={}, key=key)
        store.put_recovery(key, result, weights, masks)

    live, stale = store.recovery_checkpoint("running"), store.recovery_checkpoint("abandoned")
    for checkpoint in (live, stale):
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"0" * 200_000)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # untouched for two hours
    put("a")
    put("b")
    for key, ago in (("a", 120), ("b", 60)):  # "a" stored first
        os.utime(store.recovery_dir / f"{key}.safetensors", (time.time() - ago, time.time() - ago))
    store.recovered_weights("a")  # a use: "b" is now the least recently used weights
    assert len(list(store.recoveries())) == 2  # and listing the results (b after a) is no use of them
    put("c")
    assert not stale.exists() and live.exists()  # the stale checkpoint went first; a live one is never evicted
    assert store.get_recovery("b") is None  # then the least recently used weights, and their result with them
    assert store.get_recovery("a") is not None and store.get_recovery("c") is not None
    np.testing.assert_array_equal(store.recovered_weights("c")[0]["l"], weights["l"])
