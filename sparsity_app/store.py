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
import sqlite3
import time
from typing import Iterator

import diskcache

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


def model_key_of(plan: ModelPlan, machine: dict) -> str:
    """Everything that changes a whole-model result: the resolved plan and the machine fingerprint."""
    blob = json.dumps({"plan": dataclasses.asdict(plan), "machine": machine}, sort_keys=True)
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
        self._sensitivity = _open(self.directory / "sensitivity", SIZE_LIMIT // 8)

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

    def get_sensitivity_point(self, key: str) -> dict | None:
        """A stored sensitivity point (sensitivity.SensitivityPoint.to_dict), or None; unreadable entries are dropped."""
        try:
            raw = self._sensitivity.get(key)
            return None if raw is None else json.loads(raw)
        except Exception:
            self._sensitivity.delete(key)
            return None

    def put_sensitivity_point(self, key: str, point: dict) -> None:
        self._sensitivity.set(key, json.dumps(point))

    def __len__(self) -> int:
        return len(self._cache)

    def tunings(self) -> int:
        return len(self._tunings)

    def clear(self, results: bool = True, tuning: bool = True) -> tuple[int, int]:
        """Drop every stored result and/or tuner winner; returns how many of each were dropped."""
        dropped = (self._cache.clear() + self._models.clear() + self._sensitivity.clear() if results else 0,
                   self._tunings.clear() if tuning else 0)
        return dropped

    def close(self) -> None:
        self._cache.close()
        self._tunings.close()
        self._models.close()
        self._sensitivity.close()
