"""A request is checked once, at its door (runs.resolve), and never again below it.

A spy (fake_jobs.spy_on_resolve) logs every call of a public runs.resolve function, in this process and
in the job worker's; the measurements themselves are made up (fake_jobs.fake_measure, fake_recover), so
what is counted is the flow, in seconds.
"""
import dataclasses
import os

import fake_jobs
import pytest
from streamlit.testing.v1 import AppTest
from test_jobs import TESTS, _stop_workers, _wait

from sparsity_app.core.results import RecoveryResult
from sparsity_app.runs import resolve
from sparsity_app.serve import jobs

APP = str(TESTS.parent / "app.py")
SPIED = ("spec", "layer", "plan_fields", "plan", "recovery")


@pytest.fixture
def spy(cache_dir, tmp_path, monkeypatch):
    """() -> the names of the resolve functions called so far (here and in a worker started by this test)."""
    log = tmp_path / "resolved.log"
    monkeypatch.setenv("RESOLVE_SPY_FILE", str(log))
    for name in SPIED:  # put back after the test
        monkeypatch.setattr(resolve, name, getattr(resolve, name))
    fake_jobs.spy_on_resolve(log)
    yield lambda: log.read_text().split() if log.exists() else []
    _stop_workers(cache_dir)


def fake_recover(req, specs, key, machine, store, progress, time_limit_s):
    """Stands in for runs.recover._recover: no training, made-up scores."""
    return RecoveryResult(request=req, steps_done=req.steps, wall_s=0.0, loss=[(req.steps, 0.1)], metrics_before={},
                          metrics_after={}, dense_metrics={}, sparsity_achieved=0.9, resumed_from=0, eval_s=0.0,
                          machine=machine, key=key)


def test_cli_model_with_a_recipe_checks_its_plan_and_its_recovery_once(spy, monkeypatch, capsys):
    from sparsity_app.cli.main import main
    from sparsity_app.runs import model, recover

    monkeypatch.setattr(model, "_measure", fake_jobs.fake_measure)
    monkeypatch.setattr(recover, "_recover", fake_recover)
    assert main(["model", "--tokens", "16", "--repeat", "3", "--recipe", "fixed", "--steps", "2", "--json"]) == 0
    assert '"recovery": {"recipe": "fixed"' in capsys.readouterr().out
    assert sorted(spy()) == ["plan", "recovery"]  # the plan once, the recovery once (on that plan)


def test_a_whole_model_run_through_its_job_checks_the_plan_once(spy, monkeypatch):
    from app_pages import common

    monkeypatch.setenv("SPARSITY_APP_JOB_KINDS_MODULE", "fake_jobs")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_JOBS_MEASURE", "1")  # the worker runs the real "model" kind, its measuring faked
    monkeypatch.setattr(jobs, "_extra_loaded", False)
    common.resolved_plan.cache_clear()
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("app_pages/model.py").run()
    at.number_input(key="m_tokens").set_value(16)
    before = len(spy())
    at.button(key="FormSubmitter:model-Run the whole model").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    job_id = at.query_params["job"]
    _wait(lambda: at.run().metric, 60, "the job's result never appeared")
    assert jobs.status(job_id).state == "done" and not at.exception and not at.error
    assert spy()[before:] == ["plan"], "the page checks the plan once; the submit, the worker and the reruns never"


def test_a_sweep_point_is_checked_once(spy, monkeypatch):
    from app_pages import common
    from sparsity_app.runs import layer

    def fake_layer_measure(device, spec, shape, store, progress, retune):
        real = fake_jobs.fake_layer_result(spec, shape, device.fingerprint)
        return dataclasses.replace(real, cached=False)

    monkeypatch.setattr(layer, "_measure", fake_layer_measure)
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("app_pages/sweep.py").run()
    at.multiselect(key="sweep_blocks").set_value(["32x1"])
    at.multiselect(key="sweep_sparsities").set_value([0.8, 0.9])
    common.resolved_spec.cache_clear()  # the first render checked the default grid: these points are new now
    before = len(spy())
    at.button(key="FormSubmitter:sweep-Run sweep").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert spy()[before:] == ["layer", "layer"], "each of the two points is checked once: the rate limit, " \
        "the measurement and the charts take the checked point"


def test_a_sensitivity_run_checks_its_request_once_and_each_point_once(spy, monkeypatch):
    from sparsity_app.core.store import Store
    from sparsity_app.runs import sensitivity

    monkeypatch.setattr(sensitivity, "_evaluate_point", lambda spec, shape: sensitivity.SensitivityPoint(
        spec.layer, shape, spec.sparsity, spec.sparsity, {"lee_pearson": 0.5}, None))  # no model pass
    monkeypatch.setattr(sensitivity, "_dense_metrics", lambda model, store: {"lee_pearson": 0.6})
    request = sensitivity.SensitivityRequest(layers=("encoder.layer.0.attention.self.query",), sparsities=(0.5, 0.9),
                                             time_kernels=False).resolve()  # the door
    assert spy() == ["plan_fields", "spec", "spec"]  # the pattern once, each sparsity on the first layer
    store = Store()
    result = sensitivity.run_sensitivity(request, store=store)
    assert sensitivity.lookup(request, store).points == [dataclasses.replace(p, cached=True) for p in result.points]
    assert spy()[3:] == ["spec", "spec"] * 2  # below the door: each point's Spec made once per pass, no request check
