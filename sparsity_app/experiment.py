"""run(spec) -> Result: prune -> BSR -> compile -> time -> score -> store, in that order."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from . import proxies, tuner
from .errors import UserError
from .formats import sparse_format, to_bsr
from .models import get_model, layer_info
from .pruning import prune
from .spec import Result, Spec
from .store import Store, key_of
from .timing import fingerprint, measure

STEPS = ("prune", "bsr", "compile", "time", "score")  # what `progress` is told, in order
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


def run(spec: Spec, store: Store | None = None, progress: Progress = _quiet, repeat: int = 25) -> Result:
    """Measure one configuration; with a store, a stored result returns at once (cached=True).

    Raises UserError for a request that cannot be measured (unknown model, block that does not
    divide the layer, ...).
    """
    spec, shape = validate(spec)
    model = get_model(spec.model)
    if store is not None and (hit := lookup(spec, store)) is not None:
        return hit

    from .kernels import host_mcpu, set_threads  # imports TVM and torch: only on a cache miss
    from .kernels.dense import TorchDense, TVMDense

    machine = fingerprint()
    weight, bias = model.weight(spec.layer)
    x = model.calibration(spec.layer, spec.tokens)

    progress("prune", f"{spec.label()} at sparsity {spec.sparsity:.2f} on {shape[0]}x{shape[1]}")
    mask = prune(weight, spec)
    pruned = weight * mask
    achieved = 1.0 - float(mask.mean())

    family, sparse = sparse_format(weight, mask, spec)
    bsr = to_bsr(weight, mask, spec.block)  # block count, whatever format the kernel reads
    progress("bsr", f"converting to {FORMAT_NAMES[family]} ({bsr.nnz_blocks} blocks of "
                    f"{spec.block[0]}x{spec.block[1]}, {sparse.nbytes / 1024:.0f} KiB)")

    set_threads(spec.threads)
    reference = x.astype(np.float64) @ pruned.astype(np.float64).T
    progress("compile", "compiling the tuned schedule" if store is not None and tuner.is_tuned(
        family, sparse, x, spec, spec.threads, store) else "tuning: compiling and timing candidate schedules")
    start = time.perf_counter()
    tuning = tuner.best_schedule(family, sparse, x, reference, spec, spec.threads, store)
    kernel = tuner.families()[family].kernel(sparse, x, tuning.knobs())
    compile_s = time.perf_counter() - start
    tvm_dense, torch_dense = TVMDense(weight, x), TorchDense(weight, x)
    tuner.check_output("TVM sparse", kernel.output(), reference)
    tuner.check_output("TVM dense", tvm_dense.output(), x.astype(np.float64) @ weight.astype(np.float64).T)

    progress("time", f"timing the TVM {family.upper()} kernel, TVM dense and PyTorch dense on {spec.threads} threads")
    times = measure({"tvm_bsr": kernel.run, "tvm_dense": tvm_dense.run, "torch_dense": torch_dense.run},
                    repeat=repeat)

    progress("score", "scoring the accuracy proxies")
    rel, cos = proxies.output_error(x, weight, pruned, bias)
    scores = {"retained_energy": proxies.retained_energy(weight, mask), "output_rel_error": rel,
              "output_cosine": cos, **proxies.model_level(spec.model, spec.layer, pruned)}

    result = Result(spec=spec, shape=shape, sparsity_achieved=achieved, nnz_blocks=bsr.nnz_blocks,
                    bsr_bytes=sparse.nbytes, dense_bytes=weight.nbytes, times_ms=times, compile_s=compile_s,
                    proxies=scores, machine={**machine, "threads": spec.threads},
                    kernel={"format": family, "mcpu": host_mcpu(), "knobs": tuning.winner, "schedule": tuning.label,
                            "tuning": tuning.to_dict(), "dense": vars(tvm_dense.knobs)},
                    real_weights=model.real_weights)
    if store is not None:
        store.put(key_of(spec, machine), result)
    return result


def lookup(spec: Spec, store: Store) -> Result | None:
    """The stored result of `spec` on this machine, or None; never computes anything."""
    spec, _ = validate(spec)
    return store.get(key_of(spec, fingerprint()))


def mask_of(spec: Spec) -> np.ndarray:
    """The keep-mask, bool [out, in], that `run(spec)` measures (pruning only: no TVM)."""
    spec, _ = validate(spec)
    weight, _ = get_model(spec.model).weight(spec.layer)
    return prune(weight, spec)


__all__ = ["run", "STEPS", "UserError"]
