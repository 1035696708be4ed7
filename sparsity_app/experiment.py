"""run(spec) -> Result: prune -> format -> tune -> compile -> verify -> time -> score -> store.

Each step is a small function; `run` strings them together, tells `progress` as each begins, and
records how long each took (Result.step_s), so the figures a user reads about time come from the run.
Compiling, verifying and timing go through a device (backend.py): this process, or a remote device
behind TVM's RPC tracker (remote.py); everything else runs here.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import numpy as np

from . import limits, proxies, tuner
from .backend import LOCAL, Backend, LocalDevice
from .errors import UserError
from .formats import sparse_format, to_bsr
from .models import get_model, layer_info
from .pruning import ACTIVATION_AWARE, prune
from .spec import SPARSE, Result, Spec
from .store import Store, key_of

STEPS = ("prune", "format", "tune", "compile", "verify", "time", "score")  # what `progress` is told, in order
FORMAT_NAMES = {"bsr": "BSR", "csr": "CSR", "nm": "the N:M format"}
Progress = Callable[[str, str], None]  # (step, one-line detail)


def _quiet(step: str, detail: str) -> None:
    pass


def validate(spec: Spec, cores: int | None = None) -> tuple[Spec, tuple[int, int]]:
    """The resolved spec and its layer's (out, in) shape; UserError for anything unmeasurable.

    cores: the measuring device's (default this machine's). Cheap (no weights, no TVM): call it on
    a whole grid before measuring any of it.
    """
    spec = spec.resolve(cores)
    shape = layer_info(spec.model, spec.layer).shape
    spec.check_shape(shape)
    return spec, shape


class StepClock:
    """Tells `progress` as each step begins and keeps its wall time."""

    def __init__(self, progress: Progress, steps: tuple[str, ...] = STEPS):
        self.progress, self.seconds, self.steps = progress, {}, steps

    @contextlib.contextmanager
    def step(self, name: str, detail: str) -> Iterator[None]:
        assert name in self.steps
        limits.check_time(f"step {name!r}")
        self.progress(name, detail)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 4)


def run(spec: Spec, store: Store | None = None, progress: Progress = _quiet, retune: bool = False,
        backend: Backend = LOCAL) -> Result:
    """Measure one configuration; with a store, a stored result returns at once (cached=True).

    retune=True measures again and re-tunes the schedule even if a result or winner is stored.
    backend: where to measure (backend.Backend; an RPC backend takes one server from its tracker).
    Raises UserError for a request that cannot be measured (unknown model, block that does not
    divide the layer, ...) or is beyond this server's limits (limits.LimitExceeded: tokens; the
    measurement's time limit, which stops it between steps, compiles and samples).
    """
    if backend.resolve().kind == "local":
        return run_on(LocalDevice(), spec, store, progress, retune)
    from . import remote

    if store is not None and not retune and (hit := lookup(spec, store, backend)) is not None:
        return hit  # no server is taken for a stored result
    with remote.open_device(backend) as device:
        return run_on(device, spec, store, progress, retune)


def run_on(device, spec: Spec, store: Store | None = None, progress: Progress = _quiet, retune: bool = False) -> Result:
    """`run` on a device already at hand (backend.LocalDevice, or remote.RemoteDevice: a sweep's worker)."""
    spec, shape = validate(spec, device.cores)
    key = key_of(spec, device.fingerprint)
    if store is not None and not retune and (hit := store.get(key)) is not None:
        return hit
    limits.current().check_tokens(spec.tokens)
    with device.slot(f"run {spec.label()} {spec.layer}",
                     waiting=lambda ahead: progress("queue", f"waiting: {ahead} measurement(s) ahead of this one")):
        if store is not None and not retune and (hit := store.get(key)) is not None:
            return hit  # measured by the one we waited for
        with limits.time_limit("measure_timeout_s"):  # from the first step, not while queued
            return _measure(device, spec, shape, store, progress, retune)


def _measure(device, spec: Spec, shape: tuple[int, int], store: Store | None, progress: Progress,
             retune: bool) -> Result:
    model, machine, clock = get_model(spec.model), device.fingerprint, StepClock(progress)
    weight, bias = model.weight(spec.layer)
    x = model.calibration(spec.layer, spec.tokens)

    with clock.step("prune", f"{spec.label()} at sparsity {spec.sparsity:.2f} on {shape[0]}x{shape[1]}"):
        mask = prune(weight, spec, layer_input_norms(spec))
        pruned = weight * mask
    with clock.step("format", "storing the kept weights in the kernel's sparse format"):
        family, sparse = sparse_format(weight, mask, spec)
        stored = to_bsr(weight, mask, spec.block).nnz_blocks  # blocks of spec.block, whatever the format
    stored_note = (f"{FORMAT_NAMES[family]} holds {stored} blocks of {spec.block[0]}x{spec.block[1]} "
                   f"in {sparse.nbytes / 1024:.0f} KiB; ")

    device.set_threads(spec.threads)
    reference = x.astype(np.float64) @ pruned.astype(np.float64).T
    tuned = store is not None and not retune and tuner.is_tuned(family, sparse, x, spec, spec.threads, store, device)
    with clock.step("tune", stored_note + ("reusing the stored winning schedule" if tuned else
                                          "tuning: compiling, checking and timing candidate schedules")):
        tuning = tuner.best_schedule(family, sparse, x, reference, spec, spec.threads, store, retune=retune,
                                     device=device)
    with clock.step("compile", f"compiling the {FORMAT_NAMES[family]} kernel ({tuning.label}) and the dense peers"):
        kernel = tuner.compile_kernel(tuner.families()[family], sparse, x, tuning.knobs(), device)
        peers = device.dense_peers(weight, x)
        prepared = device.prepare({SPARSE: kernel, **peers})
    with clock.step("verify", "checking every kernel against NumPy before timing it"):
        errors = _verify(prepared, peers, x, weight, reference)
    with clock.step("time", f"timing the sparse kernel and {len(peers)} dense peers on {spec.threads} threads "
                    f"({spec.repeat} samples each)"):
        times = prepared.time(repeat=spec.repeat)
    with clock.step("score", "scoring the accuracy proxies on the full calibration set"):
        scores, scored = _score(spec, weight, mask, bias)

    result = Result(spec=spec, shape=shape, sparsity_achieved=1.0 - float(mask.mean()), stored_blocks=stored,
                    sparse_bytes=sparse.nbytes, dense_bytes=weight.nbytes, times_ms=times,
                    tune_s=0.0 if tuning.cached else clock.seconds["tune"], compile_s=clock.seconds["compile"],
                    proxies=scores, scored_tokens=scored, machine={**machine, "threads": spec.threads},
                    kernel={"format": family, "mcpu": device.mcpu(), "knobs": tuning.winner, "schedule": tuning.label,
                            "tuning": tuning.to_dict(), "dense": vars(peers["tvm_dense"].knobs)},
                    step_s=dict(clock.seconds), real_weights=model.real_weights,
                    backend={**device.where(times), "max_rel_error": errors})
    if store is not None:
        store.put(key_of(spec, machine), result)
    return result


def _verify(prepared, peers: dict, x: np.ndarray, weight: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """name -> max relative error of each kernel's output, computed where it runs, against NumPy
    here. A kernel that computes the wrong answer never reports a time (raises RuntimeError)."""
    errors = {SPARSE: tuner.check_output("TVM sparse", prepared.output(SPARSE), reference)}
    dense_reference = x.astype(np.float64) @ weight.astype(np.float64).T
    for name in peers:
        errors[name] = tuner.check_output(name, prepared.output(name), dense_reference)
    return errors


def _score(spec: Spec, weight: np.ndarray, mask: np.ndarray, bias: np.ndarray | None) -> tuple[dict, int]:
    """(proxies, scored tokens): layer proxies on every calibration token, whatever spec.tokens is."""
    x_all = get_model(spec.model).calibration_set(spec.layer)
    pruned = weight * mask
    rel, cos = proxies.output_error(x_all, weight, pruned, bias)
    scores = {"retained_energy": proxies.retained_energy(weight, mask), "output_rel_error": rel,
              "output_cosine": cos, **proxies.model_level(spec.model, spec.layer, pruned)}
    return scores, len(x_all)


def lookup(spec: Spec, store: Store, backend: Backend = LOCAL) -> Result | None:
    """The stored result of `spec` on the backend's device with this code, or None; never measures
    (an RPC backend's device is asked what it is once per process: remote.probe)."""
    if backend.resolve().kind == "local":
        device = LocalDevice()
    else:
        from . import remote

        device = remote.probe(backend)
    spec, _ = validate(spec, device.cores)
    return store.get(key_of(spec, device.fingerprint))


def mask_of(spec: Spec) -> np.ndarray:
    """The keep-mask, bool [out, in], that `run(spec)` measures (pruning only: no TVM)."""
    spec, _ = validate(spec)
    weight, _ = get_model(spec.model).weight(spec.layer)
    return prune(weight, spec, layer_input_norms(spec))


def layer_input_norms(spec: Spec) -> np.ndarray | None:
    """The input norms an activation-aware method scores with (None for the others): float64 [in],
    measured on training text that no metric scores (`Model.pruning_input_norms`), never on the
    calibration set the proxies and metrics use, and independent of the timed token count."""
    return get_model(spec.model).pruning_input_norms(spec.layer) if spec.method in ACTIVATION_AWARE else None


__all__ = ["run", "run_on", "lookup", "validate", "mask_of", "layer_input_norms", "STEPS", "UserError"]
