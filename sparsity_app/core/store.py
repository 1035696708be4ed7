"""Result cache on disk (diskcache), keyed by the resolved Spec plus the machine fingerprint.

Values are JSON text (Result.to_dict; tuner.Tuning.to_dict under tuning/), so a code change never
meets an unpicklable object, and nothing is ever unpickled: the cache's Disk refuses any row that is
not text (a pickle written by another program into the directory is dropped unread). An entry that
cannot be read back is dropped and recomputed, never a crash; an unreadable index (cache.db) is kept
aside and the cache starts afresh, with a note saying so. Size is bounded (limits.Limits.cache_mb)
and the least recently used entries are evicted first (reading a result, for a chart too, is a use).
Recovered weights (safetensors, ~53 MB for MiniLM) and the checkpoints of unfinished recovery runs
(~140 MB) live beside it under their own budget (limits.Limits.weights_mb), least recently used
evicted first (reading the weights is a use; listing results is not); a checkpoint written in the
last hour is never evicted (its run may be going on).
A write that fails (a full disk) raises CacheWriteError; everything stored before stays readable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
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
from diskcache.core import MODE_RAW, MODE_TEXT, UNKNOWN
from safetensors.numpy import load_file, save_file

from sparsity_app.core import limits
from sparsity_app.core.errors import UserError, one_line
from sparsity_app.core.requests import ModelPlan, Spec
from sparsity_app.core.results import ModelResult, RecoveryResult, Result

DEFAULT_DIR = pathlib.Path(__file__).resolve().parents[2] / "cache"


class CacheWriteError(UserError):
    """A result (or tuned schedule) could not be stored, e.g. the disk is full; nothing stored before is lost."""


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


class _TextDisk(diskcache.Disk):
    """diskcache's serializer, restricted to text keys and text values: it never pickles or unpickles.

    A row stored any other way (pickle, binary) is refused on reading: the key reads as None (skipped),
    the value raises ValueError (the entry is dropped as unreadable).
    """

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"cache keys are text, got {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        return super().get(key, raw) if raw else None

    def store(self, value, read, key=UNKNOWN):
        if type(value) is not str or read:
            raise TypeError(f"cache values are JSON text, got {type(value).__name__}")
        return super().store(value, read, key)

    def fetch(self, mode, filename, value, read):
        if mode not in (MODE_RAW, MODE_TEXT) or read:
            raise ValueError(f"refusing a cache entry stored as mode {mode} (not text)")
        text = super().fetch(mode, filename, value, read)
        if type(text) is not str:
            raise ValueError("refusing a cache entry that is not text")
        return text


def _open(directory: pathlib.Path, size_limit: int, notes: list[str]) -> diskcache.Cache:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot use {directory} as the cache directory: {e.strerror or e}") from None
    settings = dict(size_limit=size_limit, eviction_policy="least-recently-used", disk=_TextDisk)
    try:
        return diskcache.Cache(str(directory), **settings)
    except sqlite3.DatabaseError as e:
        # The index itself is unreadable: keep it aside for inspection and start this directory afresh
        # (only its index: the other namespaces, e.g. tuning/, stay as they are).
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).rename(directory / f"{name}.corrupt-{stamp}")
        note = (f"the cache index {directory / 'cache.db'} was unreadable ({one_line(e)}); it is kept aside as "
                f"cache.db.corrupt-{stamp} and this cache starts afresh")
        notes.append(note)
        return diskcache.Cache(str(directory), **settings)


def _drop(cache: diskcache.Cache, key) -> None:
    """Forget an unreadable entry; if even that fails (a damaged index), leave it."""
    with contextlib.suppress(Exception):
        cache.delete(key)


def _read(cache: diskcache.Cache, key) -> dict | None:
    """The JSON object stored under `key`, or None (absent, unreadable or not text: dropped)."""
    if not isinstance(key, str):
        return None
    try:
        raw = cache.get(key)
        return None if raw is None else json.loads(raw)
    except sqlite3.OperationalError:  # e.g. the disk is full and the access time cannot be updated: keep it
        return None
    except Exception:  # corrupt, not text, or from an incompatible version: recompute
        _drop(cache, key)
        return None


def _keys(cache: diskcache.Cache, notes: list[str]) -> list:
    """Every key of `cache`; none (with a note) if its index cannot be read."""
    try:
        return list(cache.iterkeys())
    except sqlite3.Error as e:
        notes.append(f"cannot list the cache at {cache.directory}: {one_line(e)}")
        return []


def _write(cache: diskcache.Cache, key: str, text: str, what: str) -> None:
    """Store `text` under `key`; CacheWriteError (one line) if the disk or the index refuses."""
    try:
        cache.set(key, text)
    except (OSError, sqlite3.Error, diskcache.Timeout) as e:
        full = getattr(e, "errno", None) == errno.ENOSPC or "full" in str(e).lower()
        why = f"the disk is full ({one_line(e)})" if full else one_line(e)
        raise CacheWriteError(f"could not store the {what} in {cache.directory}: {why}; results stored before are "
                              "kept and still served; free some space (or set SPARSITY_APP_CACHE_DIR to another "
                              "disk) and run it again") from None


def _touch(path: pathlib.Path) -> None:
    """Mark a file used now (its mtime), for least-recently-used eviction; a read-only cache stays as it is."""
    with contextlib.suppress(OSError):
        os.utime(path)


class Store:
    """Layer results, whole-model results, and the tuner's winners, each in its own namespace
    (`results()` reads every key of its own)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = cache_dir(directory)
        self.notes: list[str] = []  # what went wrong reading the cache (an index kept aside), for the doors to show
        budget = limits.current().cache_bytes()
        self._cache = _open(self.directory, budget * 2 // 3, self.notes)
        self._tunings = _open(self.directory / "tuning", budget // 8, self.notes)
        self._models = _open(self.directory / "models", budget // 8, self.notes)
        self._recoveries = _open(self.directory / "recovered", budget // 24, self.notes)  # RecoveryResult JSON
        self._sensitivity = _open(self.directory / "sensitivity", budget // 24, self.notes)  # SensitivityPoint JSON
        self.recovery_dir = self.directory / "recovered-weights"  # <key>.safetensors, <key>/checkpoint.pt

    def get(self, key: str) -> Result | None:
        d = _read(self._cache, key)
        try:
            return None if d is None else dataclasses.replace(Result.from_dict(d), cached=True)
        except Exception:  # from an incompatible version: recompute
            _drop(self._cache, key)
            return None

    def put(self, key: str, result: Result) -> None:
        _write(self._cache, key, json.dumps(dataclasses.replace(result, cached=False).to_dict()), "result")

    def get_tuning(self, key: str) -> dict | None:
        """A stored tuner winner (tuner.Tuning.to_dict), or None; unreadable entries are dropped."""
        return _read(self._tunings, key)

    def put_tuning(self, key: str, tuning: dict) -> None:
        _write(self._tunings, key, json.dumps(tuning), "tuned schedule")

    def results(self, model: str | None = None, layer: str | None = None) -> Iterator[Result]:
        """Every readable stored result, optionally only those of one model / layer."""
        for key in _keys(self._cache, self.notes):
            result = self.get(key)
            if result and (model is None or result.spec.model == model) and (layer is None or result.spec.layer == layer):
                yield result

    def get_model_result(self, key: str) -> ModelResult | None:
        d = _read(self._models, key)
        try:
            return None if d is None else dataclasses.replace(ModelResult.from_dict(d), cached=True)
        except Exception:  # from an incompatible version: recompute
            _drop(self._models, key)
            return None

    def put_model_result(self, key: str, result: ModelResult) -> None:
        _write(self._models, key, json.dumps(dataclasses.replace(result, cached=False).to_dict()), "whole-model result")

    def model_results(self, model: str | None = None) -> Iterator[ModelResult]:
        """Every readable stored whole-model result, optionally of one model."""
        for key in _keys(self._models, self.notes):
            result = self.get_model_result(key)
            if result and (model is None or result.plan.model == model):
                yield result

    def get_sensitivity_point(self, key: str) -> dict | None:
        """A stored sensitivity point (sensitivity.SensitivityPoint.to_dict), or None; unreadable entries are dropped."""
        d = _read(self._sensitivity, key)
        return d if isinstance(d, dict) else None

    def put_sensitivity_point(self, key: str, point: dict) -> None:
        _write(self._sensitivity, key, json.dumps(point), "sensitivity point")

    def get_recovery(self, key: str):
        """A stored RecoveryResult whose weights file is still there, or None."""
        d = _read(self._recoveries, key)
        try:
            if d is None:
                return None
            if not (self.recovery_dir / f"{key}.safetensors").exists():
                raise FileNotFoundError(key)
            return dataclasses.replace(RecoveryResult.from_dict(d), cached=True)
        except Exception:  # incompatible, or its weights are gone: train again
            _drop(self._recoveries, key)
            return None

    def put_recovery(self, key: str, result, weights: dict, masks: dict) -> None:
        """Store recovered weights (layer -> float32 [out, in]) and masks (bool [out, in]) as
        safetensors, then the result that points at them."""
        tensors = {f"weight/{n}": np.ascontiguousarray(w, np.float32) for n, w in weights.items()}
        tensors |= {f"mask/{n}": np.ascontiguousarray(masks[n], np.uint8) for n in weights}
        path = self.recovery_dir / f"{key}.safetensors"
        tmp = path.with_suffix(".tmp")
        try:
            self.recovery_dir.mkdir(parents=True, exist_ok=True)
            self._make_room(sum(t.nbytes for t in tensors.values()), keep=path)
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CacheWriteError(f"could not store the recovered weights in {self.recovery_dir}: {one_line(e)}; "
                                  "results stored before are kept") from None
        _write(self._recoveries, key, json.dumps(dataclasses.replace(result, cached=False).to_dict()), "recovery result")

    def recovered_weights(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(weights layer -> float32 [out, in], masks layer -> bool [out, in]) of a stored recovery."""
        path = self.recovery_dir / f"{key}.safetensors"
        tensors = load_file(str(path))
        _touch(path)
        weights = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("weight/")}
        return weights, {n: tensors[f"mask/{n}"].astype(bool) for n in weights}

    def _make_room(self, incoming: int, keep: pathlib.Path) -> None:
        """Evict the least recently used recovered weights and stale checkpoints (untouched for an hour) until
        what stays plus `incoming` bytes fits limits.Limits.weights_mb. Their results go with them (get_recovery
        drops a result whose weights are gone)."""
        budget = limits.current().weights_bytes()
        if not self.recovery_dir.exists():
            return
        items = []  # (last use, bytes, path): a weights file, or a checkpoint's directory
        for path in self.recovery_dir.iterdir():
            try:
                files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
                stats = [f.stat() for f in files]
            except OSError:
                continue
            last = max((st.st_mtime for st in stats), default=0.0)
            items.append((last, sum(st.st_size for st in stats), path))
        used = sum(size for _, size, _ in items)
        for last, size, path in sorted(items):
            if used + incoming <= budget:
                break
            if path == keep or (path.is_dir() and time.time() - last < 3600):
                continue
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            used -= size

    def recovery_checkpoint(self, key: str) -> pathlib.Path:
        """Where a recovery run keeps its checkpoint (the file may not exist)."""
        return self.recovery_dir / key / "checkpoint.pt"

    def recoveries(self, model: str | None = None) -> Iterator:
        """Every readable stored RecoveryResult, optionally of one model."""
        for key in _keys(self._recoveries, self.notes):
            result = self.get_recovery(key)
            if result and (model is None or result.request.plan.model == model):
                yield result

    def __len__(self) -> int:
        return len(self._cache)

    def tunings(self) -> int:
        return len(self._tunings)

    def clear(self, results: bool = True, tuning: bool = True) -> tuple[int, int]:
        """Drop every stored result and/or tuner winner; returns how many of each were dropped."""
        dropped = (self._cache.clear() + self._models.clear() + self._recoveries.clear() + self._sensitivity.clear()
                   if results else 0,
                   self._tunings.clear() if tuning else 0)
        if results and self.recovery_dir.exists():
            shutil.rmtree(self.recovery_dir, ignore_errors=True)
        return dropped

    def close(self) -> None:
        self._cache.close()
        self._tunings.close()
        self._models.close()
        self._recoveries.close()
        self._sensitivity.close()
