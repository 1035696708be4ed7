"""Test-only job kinds, registered in the worker through $SPARSITY_APP_JOB_KINDS_MODULE=fake_jobs.

"sleep": request {"name": str, "steps": int, "step_s": float}; holds the measurement slot while it
sleeps `steps` times, one progress line per step, then stores {"name": ...} as a file result.
With $FAKE_JOBS_MODEL=1 it also stands in for "model": the same sleeps, then a ModelResult of the
plan with made-up times (synthetic weights: no metrics), so the page's job flow runs in seconds.
With $FAKE_JOBS_MEASURE=1 the real "model" kind runs, but run_model's measurement is `fake_measure`.
With $RESOLVE_SPY_FILE set, every call of a public runs.resolve function appends its name to that file
(`spy_on_resolve`): a test counts how often one request is checked, across processes.
"""
import dataclasses
import hashlib
import json
import os
import time

from sparsity_app.core.errors import UserError
from sparsity_app.measure import locks
from sparsity_app.serve import jobs
from sparsity_app.serve.jobs import JOB_KINDS, JobKind


def _file(store, request: dict):
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    return key, store.directory / "fake-results" / f"{key}.json"


def sleep_stored(request: dict, store) -> str | None:
    if not isinstance(request.get("steps"), int) or request["steps"] < 1:
        raise UserError("steps must be a positive integer")
    key, path = _file(store, request)
    return key if path.exists() else None


def sleep_run(request: dict, progress, store) -> str:
    with locks.measurement_slot(f"fake {request['name']}"):
        for i in range(request["steps"]):
            time.sleep(request["step_s"])
            progress("work", f"step {i + 1}/{request['steps']}", (i + 1) / request["steps"])
    key, path = _file(store, request)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": request["name"]}))
    os.replace(tmp, path)
    return key


def fake_result(plan, specs):
    """A ModelResult of a resolved plan with made-up times (synthetic weights: no metrics)."""
    from sparsity_app.core.results import ModelResult, Timing
    from sparsity_app.measure.timing import fingerprint

    times = {name: Timing(median=ms, spread=0.1, min=ms, max=ms, runs=3)
             for name, ms in (("tvm_sparse", 2.0), ("tvm_dense", 5.0), ("torch_eager", 8.0),
                              ("torch_eager_pruned", 8.0), ("onnxruntime", 6.0))}
    return ModelResult(plan=plan, sparsity_achieved=0.9,
                       layers=[{"layer": name, "pattern": "made up", "kernel_ms": 0.01} for name in specs],
                       times_ms=times, breakdown={"tvm_sparse": {"linears": 1.0, "other": 1.0},
                                                  "tvm_dense": {"linears": 4.0, "other": 1.0}},
                       max_abs_error=0.0, metrics={}, dense_metrics={}, tune_s=0.0, compile_s=0.0,
                       machine={**fingerprint(), "threads": plan.threads}, real_weights=False)


def fake_layer_result(spec, shape, machine):
    """A layer Result of a resolved spec with made-up times and proxies."""
    from sparsity_app.core.results import DENSE_PEERS, SPARSE, Result, Timing

    times = {name: Timing(median=ms, spread=0.001, min=ms, max=ms, runs=3)
             for name, ms in ((SPARSE, 0.01), *((peer, 0.05) for peer in DENSE_PEERS))}
    proxies = {"retained_energy": 0.5, "output_rel_error": 0.5, "output_cosine": 0.8, "embedding_cosine": 0.9,
               "lee_pearson": 0.6}
    return Result(spec=spec, shape=tuple(shape), sparsity_achieved=spec.sparsity, stored_blocks=1, sparse_bytes=4,
                  dense_bytes=4 * shape[0] * shape[1], times_ms=times, tune_s=0.0, compile_s=0.0, proxies=proxies,
                  machine={**machine, "threads": spec.threads}, kernel={"format": "bsr", "schedule": "made up"})


def fake_measure(plan, specs, store, progress, retune, recovery=None):
    """Stands in for runs.model._measure: the steps told, a made-up result."""
    for step in ("prune", "tune", "compile", "time"):
        progress(step, f"pretending to {step}")
    return dataclasses.replace(fake_result(plan, specs), recovery=None if recovery is None else recovery.summary())


def spy_on_resolve(path) -> None:
    """Wrap the public runs.resolve functions: each call appends its name (one line) to `path`."""
    from sparsity_app.runs import resolve

    def spy(name, fn):
        def call(*args, **kwargs):
            with open(path, "a") as f:
                f.write(name + "\n")
            return fn(*args, **kwargs)
        return call

    for name in ("spec", "layer", "plan_fields", "plan", "recovery"):
        fn = getattr(resolve, name)
        if not hasattr(fn, "spied"):
            wrapped = spy(name, fn)
            wrapped.spied = True
            setattr(resolve, name, wrapped)


def fake_model_run(request: dict, progress, store) -> str:
    from sparsity_app.core.store import model_key_of
    from sparsity_app.measure.timing import fingerprint

    resolved = jobs.plan_of(request)
    plan, specs = resolved.plan, resolved.specs
    with locks.measurement_slot("fake model"):
        for step in ("prune", "tune", "compile", "time"):
            progress(step, f"pretending to {step}")
            time.sleep(float(os.environ.get("FAKE_JOBS_STEP_S", "0.5")))
    result = fake_result(plan, specs)
    key = model_key_of(plan, fingerprint())
    store.put_model_result(key, result)
    return key


KINDS = {"sleep": JobKind(run=sleep_run, stored=sleep_stored)}
if os.environ.get("FAKE_JOBS_MODEL"):
    KINDS["model"] = dataclasses.replace(JOB_KINDS["model"], run=fake_model_run)
JOB_KINDS.update(KINDS)
if os.environ.get("FAKE_JOBS_MEASURE"):
    from sparsity_app.runs import model as _model

    _model._measure = fake_measure
if os.environ.get("RESOLVE_SPY_FILE"):
    spy_on_resolve(os.environ["RESOLVE_SPY_FILE"])
