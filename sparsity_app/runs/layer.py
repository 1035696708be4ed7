"""run(spec) -> Result: prune -> format -> tune -> compile -> verify -> time -> score -> store.

Each step is a small function; `run` strings them together, tells `progress` as each begins, and
records how long each took (Result.step_s), so the figures a user reads about time come from the run.
Compiling, verifying and timing go through a device (measure.backend): this process, or a remote
device behind TVM's RPC tracker (measure.remote); everything else runs here.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sparsity_app.accuracy import proxies
from sparsity_app.core import limits
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ResolvedSpec, Spec
from sparsity_app.core.results import SPARSE, Result, layer_noise
from sparsity_app.core.store import Store, key_of
from sparsity_app.measure import tuner
from sparsity_app.measure.backend import LOCAL, Backend, LocalDevice
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import pruned_layer, reconstructs
from sparsity_app.prune.formats import to_bsr
from sparsity_app.prune.methods import METHODS
from sparsity_app.runs import resolve
from sparsity_app.runs.pipeline import Progress, StepClock, cached_or_run, measure_until_sound, quiet

STEPS = ("prune", "format", "tune", "compile", "verify", "time", "score")  # what `progress` is told, in order


def run(request: Spec | ResolvedSpec, store: Store | None = None, progress: Progress = quiet, retune: bool = False,
        backend: Backend = LOCAL) -> Result:
    """Measure one configuration; with a store, a stored result returns at once (cached=True).

    request: what a door resolved (runs.resolve.layer), or a Spec, which is resolved here (the Python
    API's door).
    retune=True measures again and re-tunes the schedule even if a result or winner is stored.
    backend: where to measure (measure.backend.Backend; an RPC backend takes one server from its tracker).
    Raises UserError for a request that cannot be measured (unknown model, block that does not
    divide the layer, ...) or is beyond this server's limits (limits.LimitExceeded: tokens; the
    measurement's time limit, which stops it between steps, compiles and samples).
    """
    if backend.resolve().kind == "local":
        device = LocalDevice()
        return run_on(device, _resolved(request, device.cores), store, progress, retune)
    if (request.spec if isinstance(request, ResolvedSpec) else request).precision != "fp32":
        raise UserError("INT8 layers are measured on this machine only for now (their integer dot is chosen for "
                        "this CPU's ISA): use the local backend, or fp32 on a remote device")
    resolved = _resolved(request, _remote().probe(backend).cores)
    if store is not None and not retune and (hit := lookup(resolved, store, backend)) is not None:
        return hit  # no server is taken for a stored result
    with _remote().open_device(backend) as device:
        return run_on(device, resolved, store, progress, retune)


def run_on(device, resolved: ResolvedSpec, store: Store | None = None, progress: Progress = quiet,
           retune: bool = False) -> Result:
    """`run` on a device already at hand (measure.backend.LocalDevice, or measure.remote.RemoteDevice: a
    sweep's worker), for a request resolved against that device's cores."""
    spec, shape = resolved.spec, resolved.shape
    key = key_of(spec, device.fingerprint)
    return cached_or_run(f"run {spec.label()} {spec.layer}",
                         None if store is None or retune else lambda: store.get(key),
                         lambda: _measure(device, spec, shape, store, progress, retune), device.slot, progress,
                         time_limit="measure_timeout_s", store=None if store is None else lambda r: store.put(key, r),
                         admit=lambda: limits.current().check_tokens(spec.tokens))


def _measure(device, spec: Spec, shape: tuple[int, int], store: Store | None, progress: Progress,
             retune: bool) -> Result:
    model, machine, clock = get_model(spec.model), device.fingerprint, StepClock(progress, STEPS)
    weight, bias = model.weight(spec.layer)
    x = model.calibration(spec.layer, spec.tokens)

    with clock.step("prune", f"{spec.label()} at sparsity {spec.sparsity:.2f} on {shape[0]}x{shape[1]}"):
        mask, pruned = pruned_layer(spec)  # pruned: float32 [out, in], W * mask or reconstructed
    with clock.step("format", "storing the kept weights in the kernel's sparse format"):
        family, sparse = tuner.sparse_format(pruned, mask, spec)
        stored = to_bsr(pruned, mask, spec.block).nnz_blocks  # blocks of spec.block, whatever the format
    title = tuner.families()[family].title
    stored_note = (f"{title} holds {stored} blocks of {spec.block[0]}x{spec.block[1]} "
                   f"in {sparse.nbytes / 1024:.0f} KiB; ")

    device.set_threads(spec.threads)
    fam = tuner.families()[family]
    reference = tuner.reference_of(family, sparse, x, pruned)
    tuned = store is not None and not retune and tuner.is_tuned(family, sparse, x, spec, spec.threads, store, device)
    with clock.step("tune", stored_note + ("reusing the stored winning schedule" if tuned else
                                           "tuning: compiling, checking and timing candidate schedules")):
        tuning = tuner.best_schedule(family, sparse, x, reference, spec, spec.threads, store, retune=retune,
                                     device=device)
    with clock.step("compile", f"compiling the {title} kernel ({tuning.label}) and the dense peers"):
        kernel = tuner.compile_kernel(fam, sparse, x, tuning.knobs(), device)
        peers = device.dense_peers(weight, x, spec.precision)
        prepared = device.prepare({SPARSE: kernel, **peers})
    with clock.step("verify", "checking every kernel against NumPy before timing it"):
        errors = _verify(prepared, peers, x, weight, reference)
    achieved = 1.0 - float(mask.mean())

    def time_once():
        with clock.step("time", f"timing the sparse kernel and {len(peers)} dense peers on {spec.threads} threads "
                        f"({spec.repeat} samples each)"):
            return prepared.time(repeat=spec.repeat)

    times, noisy = measure_until_sound(time_once, lambda t: layer_noise(t, achieved), progress)
    with clock.step("score", "scoring the accuracy proxies on the full calibration set" +
                    (", and the same pattern pruned without reconstruction" if reconstructs(spec) else "")):
        scores, scored = _score(spec, weight, mask, pruned, bias,
                                None if fam.reference is None else lambda xs: fam.reference(sparse, xs))
        compared = same_pattern(spec, weight, mask, pruned, bias) if reconstructs(spec) else None

    result = Result(spec=spec, shape=shape, sparsity_achieved=achieved, stored_blocks=stored,
                    sparse_bytes=sparse.nbytes, dense_bytes=weight.nbytes, times_ms=times,
                    tune_s=0.0 if tuning.cached else clock.seconds["tune"], compile_s=clock.seconds["compile"],
                    proxies=scores, scored_tokens=scored, machine={**machine, "threads": spec.threads},
                    kernel={"format": family, "title": title, "mcpu": device.mcpu(), "knobs": tuning.winner, "schedule": tuning.label,
                            "tuning": tuning.to_dict(), "dense": vars(peers["tvm_dense"].knobs)},
                    step_s=dict(clock.seconds), real_weights=model.real_weights,
                    backend={**device.where(times), "max_rel_error": errors}, noisy=noisy, same_pattern=compared)
    return result


def _verify(prepared, peers: dict, x: np.ndarray, weight: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """name -> max relative error of each kernel's output, computed where it runs, against NumPy
    here (a peer that computes another arithmetic, INT8, says what it must match: `expected`). A
    kernel that computes the wrong answer never reports a time (raises RuntimeError)."""
    errors = {SPARSE: tuner.check_output("TVM sparse", prepared.output(SPARSE), reference)}
    dense_reference = x.astype(np.float64) @ weight.astype(np.float64).T
    for name, peer in peers.items():
        want, tolerance = tuner.expected_of(peer, dense_reference)
        errors[name] = tuner.check_output(name, prepared.output(name), want, tolerance)
    return errors


def _score(spec: Spec, weight: np.ndarray, mask: np.ndarray, pruned: np.ndarray, bias: np.ndarray | None,
           layer_output=None) -> tuple[dict, int]:
    """(proxies, scored tokens): layer proxies on every calibration token, whatever spec.tokens is.
    layer_output: the layer as its kernel computes it (INT8: quantized), None = X @ pruned^T."""
    x_all = get_model(spec.model).calibration_set(spec.layer)
    scores = proxies.score(proxies.Case(spec.model, spec.layer, weight, mask, pruned, bias, x_all, layer_output))
    return scores, len(x_all)


def same_pattern(spec: Spec, weight: np.ndarray, mask: np.ndarray, pruned: np.ndarray, bias: np.ndarray | None
                 ) -> dict[str, dict[str, float]]:
    """What a reconstructing method's update buys: the layer output proxies (on every calibration token)
    of its own weights, of its own mask without the update (W * mask), and of the same pattern at the same
    density chosen by each mask-only method that can follow it (the plain one: block, nm or magnitude;
    and wanda). -> {row name: {"output_cosine", "output_rel_error"}}."""
    x_all = get_model(spec.model).calibration_set(spec.layer)

    def scores(w: np.ndarray) -> dict[str, float]:
        rel, cos = proxies.output_error(x_all, weight, w, bias)
        return {"output_cosine": cos, "output_rel_error": rel}

    rows = {spec.label(): scores(pruned), f"{spec.method}'s mask, no update": scores(weight * mask)}
    plain = "nm" if spec.nm is not None else "block" if spec.block != (1, 1) else "magnitude"
    for method in (plain, "wanda"):
        if method in METHODS:
            other = resolve.spec(dataclasses.replace(spec, method=method))
            rows[other.label()] = scores(pruned_layer(other)[1])
    return rows


def lookup(request: Spec | ResolvedSpec, store: Store, backend: Backend = LOCAL) -> Result | None:
    """The stored result of the request on the backend's device with this code, or None; never
    measures (an RPC backend's device is asked what it is once per process: measure.remote.probe)."""
    device = LocalDevice() if backend.resolve().kind == "local" else _remote().probe(backend)
    return store.get(key_of(_resolved(request, device.cores).spec, device.fingerprint))


def _resolved(request: Spec | ResolvedSpec, cores: int) -> ResolvedSpec:
    """What a door resolved, as it is; a Spec (the Python API's) resolved here against the device's cores."""
    return request if isinstance(request, ResolvedSpec) else resolve.layer(request, cores)


def _remote():
    """measure.remote, imported for a remote backend only: TVM's RPC client loads TVM (~3 s)."""
    from sparsity_app.measure import remote  # lazy: see the docstring

    return remote


__all__ = ["run", "run_on", "lookup", "STEPS", "UserError"]
