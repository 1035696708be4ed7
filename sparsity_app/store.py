"""Result cache on disk (diskcache), keyed by the resolved Spec plus the machine fingerprint.

Values are JSON text (Result.to_dict; tuner.Tuning.to_dict under tuning/), so a code change never meets an unpicklable object; an
entry that cannot be read back is dropped and recomputed, never a crash. Size is bounded by
diskcache's least-recently-stored eviction.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sqlite3
import time
from typing import Iterator

import diskcache
import numpy as np

from .errors import UserError
from .spec import ModelPlan, ModelResult, Result, Spec

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent.parent / "cache"
SIZE_LIMIT = 256 * 2**20  # bytes; one result is ~2 KB


def cache_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """--cache-dir, else $SPARSITY_APP_CACHE_DIR, else cache/ at the project root."""
    return pathlib.Path(override or os.environ.get("SPARSITY_APP_CACHE_DIR") or DEFAULT_DIR)


def key_of(spec: Spec, machine: dict) -> str:
    """Everything that changes a result: the resolved spec (repeat included), and the machine
    fingerprint (CPU, ISA, cores, package versions, weights and data packages, code hash)."""
    blob = json.dumps({"spec": dataclasses.asdict(spec), "machine": machine}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def model_key_of(plan: ModelPlan, machine: dict, recovery: str | None = None) -> str:
    """Everything that changes a whole-model result: the resolved plan, the machine fingerprint, and
    the key of the recovery run whose weights it carries (None: the one-shot pruned weights)."""
    blob = json.dumps({"plan": dataclasses.asdict(plan), "machine": machine, **({"recovery": recovery} if recovery else {})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _open(directory: pathlib.Path, size_limit: int) -> diskcache.Cache:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot use {directory} as the cache directory: {e.strerror or e}") from None
    try:
        return diskcache.Cache(str(directory), size_limit=size_limit)
    except sqlite3.DatabaseError:
        # The index itself is unreadable: keep it aside for inspection and start afresh.
        directory.rename(directory.with_name(f"{directory.name}.corrupt-{int(time.time())}"))
        directory.mkdir(parents=True)
        return diskcache.Cache(str(directory), size_limit=size_limit)


class Store:
    """Layer results, whole-model results, and the tuner's winners, each in its own namespace
    (`results()` reads every key of its own)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = cache_dir(directory)
        self._cache = _open(self.directory, SIZE_LIMIT)
        self._tunings = _open(self.directory / "tuning", SIZE_LIMIT // 4)
        self._models = _open(self.directory / "models", SIZE_LIMIT // 4)
        self._recoveries = _open(self.directory / "recovered", SIZE_LIMIT // 16)  # RecoveryResult JSON
        self.recovery_dir = self.directory / "recovered-weights"  # <key>.safetensors, <key>/checkpoint.pt

    def get(self, key: str) -> Result | None:
        try:
            raw = self._cache.get(key)
            if raw is None:
                return None
            return dataclasses.replace(Result.from_dict(json.loads(raw)), cached=True)
        except Exception:  # corrupt or from an incompatible version: recompute
            self._cache.delete(key)
            return None

    def put(self, key: str, result: Result) -> None:
        self._cache.set(key, json.dumps(dataclasses.replace(result, cached=False).to_dict()))

    def get_tuning(self, key: str) -> dict | None:
        """A stored tuner winner (tuner.Tuning.to_dict), or None; unreadable entries are dropped."""
        try:
            raw = self._tunings.get(key)
            return None if raw is None else json.loads(raw)
        except Exception:
            self._tunings.delete(key)
            return None

    def put_tuning(self, key: str, tuning: dict) -> None:
        self._tunings.set(key, json.dumps(tuning))

    def results(self, model: str | None = None, layer: str | None = None) -> Iterator[Result]:
        """Every readable stored result, optionally only those of one model / layer."""
        for key in list(self._cache.iterkeys()):
            result = self.get(key)
            if result and (model is None or result.spec.model == model) and (layer is None or result.spec.layer == layer):
                yield result

    def get_model_result(self, key: str) -> ModelResult | None:
        try:
            raw = self._models.get(key)
            return None if raw is None else dataclasses.replace(ModelResult.from_dict(json.loads(raw)), cached=True)
        except Exception:  # corrupt or from an incompatible version: recompute
            self._models.delete(key)
            return None

    def put_model_result(self, key: str, result: ModelResult) -> None:
        self._models.set(key, json.dumps(dataclasses.replace(result, cached=False).to_dict()))

    def model_results(self, model: str | None = None) -> Iterator[ModelResult]:
        """Every readable stored whole-model result, optionally of one model."""
        for key in list(self._models.iterkeys()):
            result = self.get_model_result(key)
            if result and (model is None or result.plan.model == model):
                yield result

    def get_recovery(self, key: str):
        """A stored RecoveryResult whose weights file is still there, or None."""
        from .recovery import RecoveryResult

        try:
            raw = self._recoveries.get(key)
            if raw is None:
                return None
            if not (self.recovery_dir / f"{key}.safetensors").exists():
                raise FileNotFoundError(key)
            return dataclasses.replace(RecoveryResult.from_dict(json.loads(raw)), cached=True)
        except Exception:  # corrupt, incompatible, or its weights are gone: train again
            self._recoveries.delete(key)
            return None

    def put_recovery(self, key: str, result, weights: dict, masks: dict) -> None:
        """Store recovered weights (layer -> float32 [out, in]) and masks (bool [out, in]) as
        safetensors, then the result that points at them."""
        from safetensors.numpy import save_file

        self.recovery_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"weight/{n}": np.ascontiguousarray(w, np.float32) for n, w in weights.items()}
        tensors |= {f"mask/{n}": np.ascontiguousarray(masks[n], np.uint8) for n in weights}
        path = self.recovery_dir / f"{key}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        self._recoveries.set(key, json.dumps(dataclasses.replace(result, cached=False).to_dict()))

    def recovered_weights(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(weights layer -> float32 [out, in], masks layer -> bool [out, in]) of a stored recovery."""
        from safetensors.numpy import load_file

        tensors = load_file(str(self.recovery_dir / f"{key}.safetensors"))
        weights = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("weight/")}
        return weights, {n: tensors[f"mask/{n}"].astype(bool) for n in weights}

    def recovery_checkpoint(self, key: str) -> pathlib.Path:
        """Where a recovery run keeps its checkpoint (the file may not exist)."""
        return self.recovery_dir / key / "checkpoint.pt"

    def recoveries(self, model: str | None = None) -> Iterator:
        """Every readable stored RecoveryResult, optionally of one model."""
        for key in list(self._recoveries.iterkeys()):
            result = self.get_recovery(key)
            if result and (model is None or result.request.plan.model == model):
                yield result

    def __len__(self) -> int:
        return len(self._cache)

    def tunings(self) -> int:
        return len(self._tunings)

    def clear(self, results: bool = True, tuning: bool = True) -> tuple[int, int]:
        """Drop every stored result and/or tuner winner; returns how many of each were dropped."""
        dropped = (self._cache.clear() + self._models.clear() + self._recoveries.clear() if results else 0,
                   self._tunings.clear() if tuning else 0)
        if results and self.recovery_dir.exists():
            shutil.rmtree(self.recovery_dir, ignore_errors=True)
        return dropped

    def close(self) -> None:
        self._cache.close()
        self._tunings.close()
        self._models.close()
        self._recoveries.close()
