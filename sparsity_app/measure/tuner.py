"""The schedule tuner: which of a handful of schedules runs this sparse weight fastest here?

Each kernel family (BSR, CSR, N:M) offers a first round of candidate schedules for a weight
(`candidates`) and a second round around the first round's winner (`variants`). The tuner times
each round in one `measure` call on the real weight, after checking every candidate's output
against NumPy, and keeps the fastest. Winners are stored per (family, shape, pattern, sparsity
bucket, token bucket, threads, machine), so the app never tunes the same case twice, and a token
count never tuned runs its tuned neighbour's schedule (tiles need not divide the tokens: a
winner's tile is clipped to the count, never dropped to one token). Which knob won,
and by how much over the untuned default, is the paper's third finding made visible: the best
schedule depends on the block shape.

The families come from the registry (kernels.families.FAMILIES): adding one is a module there
plus one line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from sparsity_app.core.errors import CompileError, one_line
from sparsity_app.core.limits import check_time
from sparsity_app.core.requests import Spec
from sparsity_app.measure.backend import LocalDevice

BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)  # sparsities near one another share a tuned schedule


def _registry():
    """kernels.families, imported on first use: the kernels load TVM (~3 s), which looking up a stored
    winner never needs."""
    from sparsity_app.kernels import families as registry  # lazy: see the docstring

    return registry


def families() -> dict:
    """name -> kernels.families.Family: the registry."""
    return _registry().FAMILIES


def sparse_format(weight: np.ndarray, mask: np.ndarray, spec: Spec) -> tuple[str, object]:
    """(family name, the kept weights in its format) for a layer pruned by the resolved spec
    (kernels.families.sparse_format: the first registered family that serves it)."""
    return _registry().sparse_format(weight, mask, spec)


def bucket(sparsity: float) -> float:
    return min(BUCKETS, key=lambda b: abs(b - sparsity))


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The tuner's answer. trials: [{"knobs", "label", "median_ms", "round"}], fastest first."""

    family: str
    winner: dict[str, Any]
    label: str
    trials: list[dict[str, Any]]
    default_ms: float  # the untuned default schedule, first round
    best_ms: float
    cached: bool = False

    @property
    def gain(self) -> float:
        """How much faster the winner is than the untuned default (1.0 = the default won)."""
        return self.default_ms / self.best_ms

    def knobs(self):
        return families()[self.family].knobs(**self.winner)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gain": self.gain}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Tuning":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def token_bucket(tokens: int) -> int:
    """Token counts that share a tuned schedule: 1-8, then up to each power of two (9-16, 17-32, ...,
    65-128, ...). The candidates' tiles are powers of two up to 128, so one count's winner suits its bucket."""
    return max(8, 1 << (tokens - 1).bit_length())


def tuning_key(family: str, weight, spec: Spec, tokens: int, threads: int, machine: dict) -> str:
    pattern = list(spec.nm) if spec.nm is not None else list(spec.block)
    blob = json.dumps({"family": family, "shape": list(weight.shape), "pattern": pattern,
                       "bucket": bucket(1 - weight.density), "tokens": token_bucket(tokens), "threads": threads,
                       "machine": machine}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def tune(family: str, weight, x: np.ndarray, reference: np.ndarray, layouts: tuple[str, ...] | None = None,
         device=None) -> Tuning:
    """Time the family's candidates on this weight and X; every candidate must match `reference`.

    weight: the family's format; x: float32 [tokens, in]; reference: float64 [tokens, out] = X W^T.
    layouts: only schedules with one of these activation layouts may win (knobs without a `layout`
    are feature-major); None = any. device: where candidates are timed (measure.backend.LocalDevice when
    None; a remote.RemoteDevice tunes on the remote device); uses the threads set on it.
    """
    fam, device = families()[family], device or LocalDevice()
    tokens = x.shape[0]
    default = fam.default(tokens, weight)
    first = list(dict.fromkeys([default, *fam.candidates(tokens, weight)]))
    round1 = _time(fam, weight, x, reference, first, device)
    allowed = [k for k in round1 if layouts is None or getattr(k, "layout", "feature-major") in layouts]
    if not allowed:
        raise ValueError(f"no {family} schedule has a layout in {layouts}")
    best = min(allowed, key=lambda k: round1[k])
    second = [k for k in fam.variants(best, weight) if k not in round1]
    round2 = _time(fam, weight, x, reference, [best, *second], device) if second else {best: round1[best]}
    winner = min(round2, key=lambda k: round2[k])
    # The round-2 re-timing of the first winner puts both rounds on one scale.
    scale = round2[best] / round1[best]
    trials = [{"knobs": dataclasses.asdict(k), "label": k.label(), "median_ms": t * scale, "round": 1}
              for k, t in round1.items() if k != best]
    trials += [{"knobs": dataclasses.asdict(k), "label": k.label(), "median_ms": t, "round": 2} for k, t in round2.items()]
    trials.sort(key=lambda r: r["median_ms"])
    default_ms = round2[default] if default in round2 else round1[default] * scale
    return Tuning(family=family, winner=dataclasses.asdict(winner), label=winner.label(), trials=trials,
                  default_ms=default_ms, best_ms=round2[winner])


def _time(fam, weight, x, reference, knobs: list, device) -> dict:
    """knobs -> median ms, all timed on `device` in one round-robin measurement."""
    prepared = device.prepare({k: compile_kernel(fam, weight, x, k, device) for k in knobs})
    for k in knobs:
        check_output(k.label(), prepared.output(k), reference)
    times = prepared.time(repeat=6, per_round=2, warmup_s=0.01, min_sample_s=0.001, settle_s=0.0)
    return {k: t.median for k, t in times.items()}


def compile_kernel(fam, weight, x: np.ndarray, knobs, device=None):
    """fam.kernel(weight, x, knobs) built for `device` (its n_parts; backend.LocalDevice when None).

    Checks the measurement's time limit first (a compile itself cannot be interrupted); a failing
    build raises CompileError with TVM's first line (the device's `prepare` does the same for the
    compile proper).
    """
    check_time(f"compiling the {knobs.label()} schedule")
    try:
        return fam.kernel(weight, x, knobs, n_parts=(device or LocalDevice()).n_parts)
    except Exception as e:
        raise CompileError(f"TVM could not compile the kernel with schedule {knobs.label()}: {one_line(e)}") from e


def reference_of(family: str, weight, x: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """Y [tokens, out] a kernel of `family` on `weight` (its format) must produce from x float32 [tokens, in]:
    the family's own arithmetic (INT8: quantized, to the bit), else X @ pruned^T in float64 (pruned:
    float32 [out, in], the weights the format stores)."""
    fam = families()[family]
    return fam.reference(weight, x) if fam.reference else x.astype(np.float64) @ pruned.astype(np.float64).T


def expected_of(peer, dense_reference: np.ndarray) -> tuple[np.ndarray, float]:
    """(Y a dense peer must produce, its tolerance): a peer with its own arithmetic (INT8) says so with
    `expected()` (kernels.peers); any other computes X @ W^T, `dense_reference`, within 1e-4."""
    return peer.expected() if hasattr(peer, "expected") else (dense_reference, 1e-4)


def check_output(name: str, got: np.ndarray, want: np.ndarray, tolerance: float = 1e-4) -> float:
    """A kernel that computes the wrong answer must never produce a speedup (or win a tuning).

    Returns the max error relative to the reference's scale; raises RuntimeError if it is >= tolerance.
    """
    scale = max(float(np.abs(want).max()), 1.0)
    err = float(np.abs(got - want).max()) / scale
    if not err < tolerance:
        raise RuntimeError(f"{name} kernel disagrees with NumPy (max relative error {err:.2e})")
    return err


def best_schedule(family: str, weight, x: np.ndarray, reference: np.ndarray, spec: Spec, threads: int,
                  store=None, retune: bool = False, layouts: tuple[str, ...] | None = None, device=None) -> Tuning:
    """The stored winner for this case on this device, else `tune` now (and store the winner).

    retune=True tunes again even if a winner is stored, and replaces it. layouts: as in `tune`; a
    restricted tuning is stored under its own key. device: as in `tune`; a remote device's winners
    are keyed by its own fingerprint, so it never reuses this machine's.
    """
    device = device or LocalDevice()
    key = tuning_key(family, weight, spec, x.shape[0], threads, device.tuning_machine())
    if layouts is not None:
        key = hashlib.sha256(json.dumps([key, sorted(layouts)]).encode()).hexdigest()
    if store is not None and not retune and (hit := store.get_tuning(key)) is not None:
        return dataclasses.replace(Tuning.from_dict(hit), cached=True)
    tuning = tune(family, weight, x, reference, layouts, device)
    if store is not None:
        store.put_tuning(key, tuning.to_dict())
    return tuning


def is_tuned(family: str, weight, x: np.ndarray, spec: Spec, threads: int, store, device=None) -> bool:
    """Whether `best_schedule` would find a stored winner (it then compiles one schedule only)."""
    machine = (device or LocalDevice()).tuning_machine()
    return store.get_tuning(tuning_key(family, weight, spec, x.shape[0], threads, machine)) is not None
