"""run(spec) -> Result: prune -> format -> tune -> compile -> verify -> time -> score -> store.

Each step is a small function; `run` strings them together, tells `progress` as each begins, and
records how long each took (Result.step_s), so the figures a user reads about time come from the run.
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Iterator

import numpy as np

from . import limits, proxies, tuner
from .errors import UserError
from .formats import sparse_format, to_bsr
from .models import get_model, layer_info
from .pruning import ACTIVATION_AWARE, input_norms, prune
from .spec import SPARSE, Result, Spec
from .locks import measurement_slot
from .store import Store, key_of
from .timing import fingerprint, measure

STEPS = ("prune", "format", "tune", "compile", "verify", "time", "score")  # what `progress` is told, in order
FORMAT_NAMES = {"bsr": "BSR", "csr": "CSR", "nm": "the N:M format"}
Progress = Callable[[str, str], None]  # (step, one-line detail)


def _quiet(step: str, detail: str) -> None:
    pass


def validate(spec: Spec) -> tuple[Spec, tuple[int, int]]:
    """The resolved spec and its layer's (out, in) shape; UserError for anything unmeasurable.

    Cheap (no weights, no TVM): call it on a whole grid before measuring any of it.
    """
    spec = spec.resolve()
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


def run(spec: Spec, store: Store | None = None, progress: Progress = _quiet, retune: bool = False) -> Result:
    """Measure one configuration; with a store, a stored result returns at once (cached=True).

    retune=True measures again and re-tunes the schedule even if a result or winner is stored.
    Raises UserError for a request that cannot be measured (unknown model, block that does not
    divide the layer, ...) or is beyond this server's limits (limits.LimitExceeded: tokens; the
    measurement's time limit, which stops it between steps, compiles and samples).
    """
    spec, shape = validate(spec)
    if store is not None and not retune and (hit := lookup(spec, store)) is not None:
        return hit
    limits.current().check_tokens(spec.tokens)
    with measurement_slot(f"run {spec.label()} {spec.layer}",
                          waiting=lambda ahead: progress("queue", f"waiting: {ahead} measurement(s) ahead of this one")):
        if store is not None and not retune and (hit := lookup(spec, store)) is not None:
            return hit  # measured by the one we waited for
        with limits.time_limit("measure_timeout_s"):  # from the first step, not while queued
            return _measure(spec, shape, store, progress, retune)


def _measure(spec: Spec, shape: tuple[int, int], store: Store | None, progress: Progress, retune: bool) -> Result:
    from .kernels import host_mcpu, set_threads  # imports TVM and torch: only on a cache miss
    from .kernels.peers import dense_peers

    model, machine, clock = get_model(spec.model), fingerprint(), StepClock(progress)
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

    set_threads(spec.threads)
    reference = x.astype(np.float64) @ pruned.astype(np.float64).T
    tuned = store is not None and not retune and tuner.is_tuned(family, sparse, x, spec, spec.threads, store)
    with clock.step("tune", stored_note + ("reusing the stored winning schedule" if tuned else
                                          "tuning: compiling, checking and timing candidate schedules")):
        tuning = tuner.best_schedule(family, sparse, x, reference, spec, spec.threads, store, retune=retune)
    with clock.step("compile", f"compiling the {FORMAT_NAMES[family]} kernel ({tuning.label}) and the dense peers"):
        kernel = tuner.compile_kernel(tuner.families()[family], sparse, x, tuning.knobs())
        peers = dense_peers(weight, x)
    with clock.step("verify", "checking every kernel against NumPy before timing it"):
        _verify(kernel, peers, x, weight, reference)
    with clock.step("time", f"timing the sparse kernel and {len(peers)} dense peers on {spec.threads} threads "
                    f"({spec.repeat} samples each)"):
        times = measure({SPARSE: kernel.run, **{name: p.run for name, p in peers.items()}}, repeat=spec.repeat)
    with clock.step("score", "scoring the accuracy proxies on the full calibration set"):
        scores, scored = _score(spec, weight, mask, bias)

    result = Result(spec=spec, shape=shape, sparsity_achieved=1.0 - float(mask.mean()), stored_blocks=stored,
                    sparse_bytes=sparse.nbytes, dense_bytes=weight.nbytes, times_ms=times,
                    tune_s=0.0 if tuning.cached else clock.seconds["tune"], compile_s=clock.seconds["compile"],
                    proxies=scores, scored_tokens=scored, machine={**machine, "threads": spec.threads},
                    kernel={"format": family, "mcpu": host_mcpu(), "knobs": tuning.winner, "schedule": tuning.label,
                            "tuning": tuning.to_dict(), "dense": vars(peers["tvm_dense"].knobs)},
                    step_s=dict(clock.seconds), real_weights=model.real_weights)
    if store is not None:
        store.put(key_of(spec, machine), result)
    return result


def _verify(kernel, peers: dict, x: np.ndarray, weight: np.ndarray, reference: np.ndarray) -> None:
    """A kernel that computes the wrong answer never reports a time (raises RuntimeError)."""
    tuner.check_output("TVM sparse", kernel.output(), reference)
    dense_reference = x.astype(np.float64) @ weight.astype(np.float64).T
    for name, peer in peers.items():
        tuner.check_output(name, peer.output(), dense_reference)


def _score(spec: Spec, weight: np.ndarray, mask: np.ndarray, bias: np.ndarray | None) -> tuple[dict, int]:
    """(proxies, scored tokens): layer proxies on every calibration token, whatever spec.tokens is."""
    x_all = get_model(spec.model).calibration_set(spec.layer)
    pruned = weight * mask
    rel, cos = proxies.output_error(x_all, weight, pruned, bias)
    scores = {"retained_energy": proxies.retained_energy(weight, mask), "output_rel_error": rel,
              "output_cosine": cos, **proxies.model_level(spec.model, spec.layer, pruned)}
    return scores, len(x_all)


def lookup(spec: Spec, store: Store) -> Result | None:
    """The stored result of `spec` on this machine with this code, or None; never computes anything."""
    spec, _ = validate(spec)
    return store.get(key_of(spec, fingerprint()))


def mask_of(spec: Spec) -> np.ndarray:
    """The keep-mask, bool [out, in], that `run(spec)` measures (pruning only: no TVM)."""
    spec, _ = validate(spec)
    weight, _ = get_model(spec.model).weight(spec.layer)
    return prune(weight, spec, layer_input_norms(spec))


def layer_input_norms(spec: Spec) -> np.ndarray | None:
    """The input norms an activation-aware method scores with (None for the others): float64 [in],
    over the layer's whole calibration set, so the mask does not depend on the timed token count."""
    return _input_norms(spec.model, spec.layer) if spec.method in ACTIVATION_AWARE else None


@functools.lru_cache(maxsize=64)
def _input_norms(model: str, layer: str) -> np.ndarray:
    return input_norms(get_model(model).calibration_set(layer))


__all__ = ["run", "lookup", "validate", "mask_of", "layer_input_norms", "STEPS", "UserError"]
