"""Long jobs: a queue on disk, one detached worker, one job at a time, cancel by the owner, a killed worker mended."""
import os
import pathlib
import signal
import time

import pytest

from sparsity_app.core.errors import UserError
from sparsity_app.measure import locks
from sparsity_app.serve import jobs

TESTS = pathlib.Path(__file__).resolve().parent


@pytest.fixture
def kinds(cache_dir, monkeypatch):
    """The test-only kinds of fake_jobs, here and in the worker the submits start."""
    monkeypatch.setenv("SPARSITY_APP_JOB_KINDS_MODULE", "fake_jobs")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    import fake_jobs

    monkeypatch.setattr(jobs, "_extra_loaded", True)
    for name, kind in fake_jobs.KINDS.items():
        monkeypatch.setitem(jobs.JOB_KINDS, name, kind)
    yield cache_dir
    _stop_workers(cache_dir)


def _stop_workers(cache_dir):
    """No worker outlives its test: cancel whatever is left, wait for the worker to leave."""
    d = cache_dir / "jobs"
    if not d.exists():
        return
    for job in jobs._all(d):
        if job.state in ("queued", "running"):
            jobs.cancel(job.id, None, force=True)
    for job in jobs._all(d):
        for pid in (job.worker_pid, job.runner_pid):
            _wait(lambda: not jobs._alive(pid), 30, f"process {pid} still alive")


def _wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def _sleep(name, steps=3, step_s=0.2):
    return {"name": name, "steps": steps, "step_s": step_s}


def _done(job_id, timeout=60):
    return _wait(lambda: (j := jobs.status(job_id)).state in jobs.FINISHED and j, timeout, f"job {job_id} never finished")


def test_jobs_queue_run_one_at_a_time_in_order_and_dedupe(kinds):
    first = jobs.submit("sleep", _sleep("a", steps=5, step_s=0.4), "me").job
    second = jobs.submit("sleep", _sleep("b"), "me").job
    third = jobs.submit("sleep", _sleep("c"), "you").job
    _wait(lambda: jobs.status(first.id).state == "running", 30, "the worker never started")
    assert jobs.status(second.id).position == 1 and jobs.status(third.id).position == 2  # the running one is ahead
    again = jobs.submit("sleep", _sleep("b"), "someone else")
    assert again.result_key is None and again.job.id == second.id  # the same request: the same job

    finished = [_done(j.id) for j in (first, second, third)]
    assert [j.state for j in finished] == ["done"] * 3 and all(j.result_key for j in finished)
    assert all(a.finished <= b.started for a, b in zip(finished, finished[1:]))  # in submission order, never together
    holds = locks.holds()
    assert [h["who"] for h in holds] == ["fake a", "fake b", "fake c"]
    assert all(a["end"] <= b["start"] for a, b in zip(holds, holds[1:]))
    lines = finished[0].progress
    assert [l["detail"] for l in lines] == [f"step {i}/5" for i in range(1, 6)] and lines[-1]["fraction"] == 1.0
    assert len({j.worker_pid for j in finished}) == 1 and len({j.runner_pid for j in finished}) == 3

    cached = jobs.submit("sleep", _sleep("a", steps=5, step_s=0.4), "me")
    assert cached.job is None and cached.result_key == finished[0].result_key  # stored: no job at all
    _wait(lambda: not jobs._alive(finished[0].worker_pid), 30, "the worker did not leave with an empty queue")


def test_only_the_owner_cancels_queued_and_running_jobs_and_the_next_one_runs(kinds):
    long = jobs.submit("sleep", _sleep("long", steps=200, step_s=0.1), "owner").job
    queued = jobs.submit("sleep", _sleep("queued"), "owner").job
    last = jobs.submit("sleep", _sleep("last", steps=1, step_s=0.05), "owner").job
    with pytest.raises(UserError, match="only the session that submitted"):
        jobs.cancel(queued.id, "intruder")
    with pytest.raises(UserError, match="only the session that submitted"):
        jobs.cancel(queued.id, None)
    assert jobs.cancel(queued.id, "owner").state == "cancelled"
    _wait(lambda: jobs.status(long.id).progress, 30, "the long job never reported progress")
    with pytest.raises(UserError, match="only the session that submitted"):
        jobs.cancel(long.id, "intruder")
    jobs.cancel(long.id, "owner")
    stopped = _done(long.id, timeout=30)
    assert stopped.state == "cancelled" and stopped.result_key is None
    assert jobs.kind("sleep").stored(_sleep("long", steps=200, step_s=0.1), jobs.Store()) is None  # nothing stored
    assert jobs.status(queued.id).state == "cancelled" and jobs.status(queued.id).started is None  # never ran
    assert _done(last.id).state == "done"  # the worker went on with the next job
    assert [h["who"] for h in locks.holds()] == ["fake long", "fake last"]  # the cancelled one released the slot
    with pytest.raises(UserError, match="already finished"):
        jobs.cancel(last.id, "owner")


def test_a_killed_worker_leaves_no_job_running_forever(kinds):
    victim = jobs.submit("sleep", _sleep("victim", steps=200, step_s=0.1), "me").job
    after = jobs.submit("sleep", _sleep("after", steps=1, step_s=0.05), "me").job
    running = _wait(lambda: (j := jobs.status(victim.id)).runner_pid and j.progress and j, 30, "never ran")
    os.kill(running.worker_pid, signal.SIGKILL)
    failed = _done(victim.id, timeout=30)
    assert failed.state == "failed" and "stopped before it finished" in failed.error
    assert not jobs._alive(running.runner_pid)  # its child died with it
    assert _done(after.id).state == "done"  # a new worker took the rest of the queue
    assert jobs.status(after.id).worker_pid != running.worker_pid


def test_bad_requests_and_ids_are_one_line_errors(kinds):
    with pytest.raises(UserError, match="unknown job kind 'nope'; known kinds: model, recover, sleep"):
        jobs.submit("nope", {}, "me")
    with pytest.raises(UserError, match="steps must be"):
        jobs.submit("sleep", {"name": "x", "steps": 0, "step_s": 0}, "me")
    with pytest.raises(UserError, match="not a whole-model plan"):
        jobs.submit("model", {"colour": "blue"}, "me")
    for bad in ("../../etc/passwd", "", "A" * 32):
        with pytest.raises(UserError, match="is not a job id"):
            jobs.status(bad)
    assert jobs.status("0" * 32) is None


def test_cli_lists_and_cancels_jobs(kinds, capsys):
    from sparsity_app.cli.main import main

    long = jobs.submit("sleep", _sleep("cli", steps=200, step_s=0.1), "someone").job
    assert main(["jobs", "list"]) == 0
    assert long.id in capsys.readouterr().out
    assert main(["jobs", "cancel", long.id]) == 0  # the operator may cancel any job
    assert _done(long.id, timeout=30).state == "cancelled"
    assert main(["jobs", "cancel", "nonsense"]) == 2
    assert "is not a job id" in capsys.readouterr().err


def test_model_page_runs_a_job_that_a_reload_or_the_link_shows_then_its_result(kinds, monkeypatch):
    """The page submits a job; the owner sees progress and a cancel button, a visitor with the link sees the
    progress without it, and both then see the result (fake_jobs stands in for the model's measurement)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FAKE_JOBS_MODEL", "1")
    monkeypatch.setenv("FAKE_JOBS_STEP_S", "3.0")  # the visitor must arrive while it runs
    app = str(TESTS.parent / "app.py")
    owner = AppTest.from_file(app, default_timeout=60).run()
    owner.switch_page("app_pages/model.py").run()
    owner.number_input(key="m_tokens").set_value(16)
    owner.button(key="FormSubmitter:model-Run the whole model").click().run()
    assert not owner.exception and not owner.error, [e.value for e in owner.error]
    link = {k: owner.query_params[k] for k in owner.query_params}
    assert link["tokens"] == "16" and jobs.check_id(link["job"])
    assert owner.button(key="job_cancel")  # the owner may cancel
    assert not owner.metric  # no result yet

    visitor = AppTest.from_file(app, default_timeout=60)
    for k, v in link.items():
        visitor.query_params[k] = v
    visitor.run()
    visitor.switch_page("app_pages/model.py").run()

    def shows_progress(at):
        at.run()
        return "pretending to" in " ".join(c.value for c in at.code)
    _wait(lambda: shows_progress(visitor), 30, "the link never showed the job's progress")
    assert not any(b.key == "job_cancel" for b in visitor.button)  # a visitor watches, never cancels
    assert any("Only the browser session that started" in c.value for c in visitor.caption)

    for at in (visitor, owner):  # a rerun (what a reload does) shows the result once the job is done
        _wait(lambda: at.run().metric, 60, "the result never appeared")
        assert not at.exception and not at.error
        assert any(m.label == "Speedup vs best dense" and m.value == "2.50x" for m in at.metric)
    job = jobs.status(link["job"])
    assert job.state == "done" and [l["step"] for l in job.progress] == ["prune", "tune", "compile", "time"]


def test_model_page_ignores_a_bad_job_in_the_link(cache_dir):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(TESTS.parent / "app.py"), default_timeout=60)
    at.query_params["job"] = "../../etc/passwd"
    at.run()
    at.switch_page("app_pages/model.py").run()
    assert not at.exception and not at.error
    assert any("ignored job=" in w.value and "passwd" in w.value for w in at.warning)  # escaped Markdown
