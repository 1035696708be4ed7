"""Result cache on disk (diskcache), keyed by the resolved Spec plus the machine fingerprint.

Values are JSON text (Result.to_dict), so a code change never meets an unpicklable object; an
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

from .spec import Result, Spec

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent.parent / "cache"
SIZE_LIMIT = 256 * 2**20  # bytes; one result is ~2 KB


def cache_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """--cache-dir, else $SPARSITY_APP_CACHE_DIR, else cache/ at the project root."""
    return pathlib.Path(override or os.environ.get("SPARSITY_APP_CACHE_DIR") or DEFAULT_DIR)


def key_of(spec: Spec, machine: dict) -> str:
    """Everything that changes a result: the resolved spec, the machine, the code version."""
    blob = json.dumps({"spec": dataclasses.asdict(spec), "machine": machine}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class Store:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = cache_dir(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._cache = diskcache.Cache(str(self.directory), size_limit=SIZE_LIMIT)
        except sqlite3.DatabaseError:
            # The index itself is unreadable: keep it aside for inspection and start afresh.
            aside = self.directory.with_name(f"{self.directory.name}.corrupt-{int(time.time())}")
            self.directory.rename(aside)
            self.directory.mkdir(parents=True)
            self._cache = diskcache.Cache(str(self.directory), size_limit=SIZE_LIMIT)

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

    def results(self, model: str | None = None, layer: str | None = None) -> Iterator[Result]:
        """Every readable stored result, optionally only those of one model / layer."""
        for key in list(self._cache.iterkeys()):
            result = self.get(key)
            if result and (model is None or result.spec.model == model) and (layer is None or result.spec.layer == layer):
                yield result

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()
