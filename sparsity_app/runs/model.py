"""run_model(plan) -> ModelResult: the whole encoder pruned, compiled with our kernels, timed, scored.

plan -> prune every linear -> sparse formats + tuned schedules -> compile the sparse and the dense
TVM executables -> verify both against PyTorch -> time them with PyTorch eager (dense and pruned)
and ONNX Runtime in one `measure` call -> where the time goes -> real-label metrics -> store.
Nothing shared is modified: the pruned PyTorch model is a copy.
"""
from __future__ import annotations

import dataclasses

from sparsity_app.accuracy import metrics
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ModelPlan, ResolvedPlan, default_threads
from sparsity_app.core.results import SPARSE, ModelResult, model_noise
from sparsity_app.core.store import Store, model_key_of
from sparsity_app.measure.backend import LocalDevice
from sparsity_app.measure.locks import measurement_slot
from sparsity_app.measure.timing import fingerprint, measure
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import pruned_weights
from sparsity_app.runs import resolve
from sparsity_app.runs.pipeline import Progress, StepClock, cached_or_run, measure_until_sound, quiet

STEPS = ("prune", "tune", "compile", "verify", "time", "breakdown", "evaluate")


def lookup(request: ModelPlan | ResolvedPlan, store: Store, recovery=None) -> ModelResult | None:
    """The stored result of the plan (with `recovery`'s weights, a RecoveryResult, if given), or None."""
    return store.get_model_result(key_of(_resolved(request).plan, recovery))


def key_of(plan: ModelPlan, recovery=None) -> str:
    """The store key of a resolved plan's result on this machine (with `recovery`'s weights, if given)."""
    return model_key_of(plan, fingerprint(), None if recovery is None else recovery.key)


def run_model(request: ModelPlan | ResolvedPlan, store: Store | None = None, progress: Progress = quiet,
              retune: bool = False, reuse_result: bool = True, recovery=None) -> ModelResult:
    """Measure a whole pruned model; with a store, a stored result returns at once (cached=True).

    request: what a door resolved (runs.resolve.plan), or a ModelPlan, which is resolved here.
    retune=True re-tunes every layer's schedule; reuse_result=False measures again but keeps the
    stored schedules (what a benchmark wants). recovery: a stored RecoveryResult of this
    plan; its fine-tuned weights (and masks) replace the one-shot ones, and everything is measured
    on them (they are compiled, verified, timed and scored like any other weights).
    """
    resolved = _resolved(request)
    plan, specs = resolved.plan, resolved.specs
    if recovery is not None and (store is None or not _same_pattern(recovery.request.plan, plan)):
        raise UserError("a recovered model is measured from a store, with the plan it was recovered for")
    key = key_of(plan, recovery)
    reuse = store is not None and reuse_result and not retune
    who = f"model {plan.model} {plan.label()}" + (f" recovered by {recovery.request.recipe}" if recovery else "")
    return cached_or_run(who, (lambda: store.get_model_result(key)) if reuse else None,
                         lambda: _measure(plan, specs, store, progress, retune, recovery), measurement_slot, progress,
                         time_limit="model_timeout_s",  # stops between steps, layer tunings and samples
                         store=None if store is None else lambda r: store.put_model_result(key, r))


def _resolved(request: ModelPlan | ResolvedPlan) -> ResolvedPlan:
    """What a door resolved, as it is; a ModelPlan (the Python API's) resolved here."""
    return request if isinstance(request, ResolvedPlan) else resolve.plan(request)


def _same_pattern(a: ModelPlan, b: ModelPlan) -> bool:
    """The plans prune alike (they may differ in tokens, batch, threads, repeat)."""
    timing = dict(tokens=0, batch=1, threads=0, repeat=3)
    return dataclasses.replace(a, **timing) == dataclasses.replace(b, **timing)


def _measure(plan: ModelPlan, specs: dict, store: Store | None, progress: Progress, retune: bool,
             recovery=None) -> ModelResult:
    # lazy: the graph and the peers load TVM, PyTorch and ONNX Runtime; a stored result needs none of them
    from sparsity_app.model import baselines, graph

    model, machine, clock = get_model(plan.model), fingerprint(), StepClock(progress, STEPS)
    threads = plan.threads or default_threads()
    LocalDevice().set_threads(threads)
    hf, tokenizer = model.torch_model(), model.tokenizer()
    rows = plan.batch * plan.tokens

    with clock.step("prune", f"{plan.label()}: pruning {len(specs)} linears" if recovery is None else
                    f"{plan.label()}: the weights recovered by {recovery.request.recipe} ({recovery.steps_done} steps)"):
        weights = {name: model.weight(name) for name in specs}  # name -> (W float32 [out, in], bias)
        if recovery is None:
            # float32 [out, in]: W * mask, or a reconstructing method's new kept weights
            masks, pruned = pruned_weights(plan.model, specs, lambda line: progress("prune", line))
        else:
            pruned, masks = store.recovered_weights(recovery.key)
    with clock.step("tune", "sparse formats and each layer's schedule (layers of one shape and pattern share a "
                    "tuning)"):
        linears = graph.plan_linears(plan.model, specs, pruned, masks, {name: weights[name][1] for name in specs}, rows,
                                     threads, store, retune, plan.precision)
        plans = {name: linear for name, (linear, _) in linears.items()}
        tuned_now = sum(t is not None and not t.cached for _, t in linears.values())
        layers = [_layer_row(name, "dense", linear.family, 0.0, None, linear.weight.nbytes, weights[name][0].nbytes)
                  if tuning is None else
                  _layer_row(name, specs[name].label(), linear.family, 1.0 - float(masks[name].mean()), tuning.label,
                             linear.weight.nbytes, weights[name][0].nbytes)
                  for name, (linear, tuning) in linears.items()]
    int8 = plan.precision == "int8"
    with clock.step("compile", "compiling the sparse and the dense encoders for this CPU"
                    + (" (dense in float32 and in INT8)" if int8 else "")):
        sparse = graph.compile_encoder(hf, hf, plans, plan.batch, plan.tokens)
        executables = {"tvm_dense": graph.compile_encoder(hf, hf, {}, plan.batch, plan.tokens)}
        if int8:  # every linear the dense INT8 GEMM (weights quantized per row); and the same masks in float32
            dense_int8 = {name: graph.dense_linear(weights[name][0], weights[name][1], "int8") for name in specs}
            executables["tvm_dense_int8"] = graph.compile_encoder(hf, hf, dense_int8, plan.batch, plan.tokens)
            fp32_specs = {name: None if spec is None else dataclasses.replace(spec, precision="fp32")
                          for name, spec in specs.items()}
            fp32_plans = {name: linear for name, (linear, _) in graph.plan_linears(
                plan.model, fp32_specs, pruned, masks, {name: weights[name][1] for name in specs}, rows, threads, store,
                retune).items()}
            executables["tvm_sparse_fp32"] = graph.compile_encoder(hf, hf, fp32_plans, plan.batch, plan.tokens)
    ids, attention = baselines.example_inputs(tokenizer, plan.batch, plan.tokens)
    tolerance = graph.tolerance(plan.precision)
    with clock.step("verify", f"checking every executable against PyTorch (relative error <= {tolerance:.0e}"
                    + (", INT8 linears by their own arithmetic)" if int8 else ")")):
        reference = model.pruned_copy(pruned)  # float32: what PyTorch runs (and times) of the pruned weights
        # what the sparse executable computes: INT8 linears by the INT8 arithmetic (the model scored below)
        computed = graph.reference_model(hf, plans) if int8 else reference
        error = graph.verify(sparse, computed, ids, attention, tolerance)
        graph.verify(executables["tvm_dense"], hf, ids, attention)
        if int8:
            graph.verify(executables["tvm_dense_int8"], graph.reference_model(hf, dense_int8), ids, attention, tolerance)
            graph.verify(executables["tvm_sparse_fp32"], reference, ids, attention)
        for executable in (sparse, *executables.values()):
            executable.set_inputs(ids, attention)
        peers = {"torch_eager": baselines.torch_eager(hf, plan.batch, plan.tokens, tokenizer),
                 "torch_eager_pruned": baselines.torch_eager(reference, plan.batch, plan.tokens, tokenizer),
                 "onnxruntime": baselines.onnxruntime_session(hf, plan.batch, plan.tokens, threads, tokenizer)}
        if int8:
            peers.update(torch_dynamic_int8=baselines.torch_dynamic_int8(hf, plan.batch, plan.tokens, tokenizer),
                         onnxruntime_int8=baselines.onnxruntime_int8_session(hf, plan.batch, plan.tokens, threads,
                                                                             tokenizer))
    also = " (float32 and INT8)" if int8 else ""

    def time_once():
        with clock.step("time", f"timing TVM sparse, TVM dense{also}, PyTorch eager (dense and pruned) and ONNX "
                        f"Runtime{also} on {threads} threads, {plan.repeat} samples each"):
            LocalDevice().set_threads(threads)
            # Each runtime's idle pool spins after a pass (ONNX Runtime's for longer than TVM's): a 0.2 s
            # settle before each one's samples lets the previous pool go quiet (measured: ORT's spinning
            # raised the next runtime's median ~10% with the default 0.02 s).
            times = measure({SPARSE: sparse.run, **{name: e.run for name, e in executables.items()}, **peers},
                            repeat=plan.repeat, per_round=3, settle_s=0.2)
        with clock.step("breakdown", "timing each operator of the TVM executables"):
            return times, {SPARSE: sparse.breakdown(), **{name: e.breakdown() for name, e in executables.items()}}

    (times, breakdown), noisy = measure_until_sound(time_once, lambda figures: model_noise(*figures), progress)
    for row, ms in zip(layers, _per_linear_ms(sparse, list(specs))):
        row["kernel_ms"] = ms
    with clock.step("evaluate", "real-label metrics of the pruned model (Lee, polarity, WordSim, SimLex)"
                    + (", its linears by the INT8 arithmetic" if int8 else "")):
        metrics, dense_metrics = _evaluate(plan.model, computed)

    total = sum(m.size for m in masks.values())
    result = ModelResult(plan=plan, sparsity_achieved=float(sum((~m).sum() for m in masks.values()) / total),
                         layers=layers, times_ms=times, breakdown=breakdown, max_abs_error=error, metrics=metrics,
                         dense_metrics=dense_metrics, tune_s=clock.seconds["tune"] if tuned_now else 0.0,
                         compile_s=clock.seconds["compile"], machine={**machine, "threads": threads},
                         step_s=dict(clock.seconds), real_weights=model.real_weights,
                         recovery=None if recovery is None else recovery.summary(), noisy=noisy)
    return result


def _layer_row(name, pattern, family, achieved, schedule, sparse_bytes, dense_bytes) -> dict:
    return {"layer": name, "pattern": pattern, "format": family, "sparsity_achieved": achieved,
            "schedule": schedule, "sparse_bytes": sparse_bytes, "dense_bytes": dense_bytes, "kernel_ms": None}


def _per_linear_ms(encoder, names: list[str]) -> list[float | None]:
    """Each linear's kernel time inside the sparse executable's passes (after its breakdown); Q, K and V
    stacked into one kernel share its time evenly."""
    times = encoder.linear_times()
    return [times.get(name) for name in names]


def _evaluate(model_name: str, pruned_model) -> tuple[dict, dict]:
    """(metrics of the pruned copy, metrics of the dense model); None everywhere for synthetic weights.

    embedding_cosine compares with this model's own dense embeddings (metrics.reference_embeddings).
    """
    model = get_model(model_name)
    if not model.real_weights:
        empty = {name: None for name in metrics.METRICS}
        return empty, dict(empty)
    return (metrics.evaluate(pruned_model, model.tokenizer(), metrics.reference_embeddings(model_name)),
            dict(metrics.dense_metrics(model_name)))


__all__ = ["run_model", "lookup", "STEPS", "UserError"]
