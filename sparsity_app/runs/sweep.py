"""A sweep fanned out over a TVM RPC tracker's servers: one worker per server of the key.

Each point is a layer run (runs.layer.run_on) on the server a worker holds; stored points return at
once, each measured point is stored as it finishes, and a point whose server is lost is put back
for another server (measure.remote.DeviceLost).
"""
from __future__ import annotations

import dataclasses
import gc
import queue
import threading
import time
from typing import Callable, Iterator

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ResolvedSpec, Spec
from sparsity_app.core.results import Result
from sparsity_app.measure.backend import Backend
from sparsity_app.measure.remote import DeviceLost, RemoteDevice, probe, request_server, servers, tracker_of
from sparsity_app.runs import resolve
from sparsity_app.runs.layer import lookup, run_on


@dataclasses.dataclass(frozen=True)
class PointEvent:
    """One thing that happened to a point of a sweep."""

    kind: str  # "measured" (or read from the cache), "failed", or "retried" (its server was lost; put back)
    index: int  # position in the grid
    spec: Spec
    result: Result | None = None  # kind "measured"
    message: str = ""  # kind "failed" or "retried": one line saying why


@dataclasses.dataclass
class SweepReport:
    """What a fanned-out sweep did: results by grid index, failures (one line each), retried points."""

    results: dict[int, Result] = dataclasses.field(default_factory=dict)
    failures: dict[int, str] = dataclasses.field(default_factory=dict)
    retried: list[str] = dataclasses.field(default_factory=list)  # "point: why its server was lost"
    workers: int = 0


def sweep(specs: list[Spec | ResolvedSpec], backend: Backend, store=None, retune: bool = False,
          on_event: Callable[[PointEvent], None] | None = None, max_attempts: int = 3) -> SweepReport:
    """Measure every spec on the backend's servers, one worker per server of the key (each waits
    for the tracker to hand it a free one).

    Stored points return at once; each measured point is stored as it finishes; a point whose
    server is lost is put back for another server (at most max_attempts tries); any other failure
    is that point's one-line error. on_event is called from the worker threads (see `stream` for
    events in the caller's thread). specs: as a door resolved them against the device's cores (a Spec
    is resolved here, once, by the worker that takes it).
    """
    backend = backend.resolve()
    info = probe(backend)
    todo: queue.Queue = queue.Queue()
    for i, point in enumerate(specs):
        todo.put((i, point, 0))
    report, lock = SweepReport(), threading.Lock()
    on_event = on_event or (lambda event: None)

    def done(i: int, spec: Spec, result: Result | None, error: str | None) -> None:
        with lock:
            if result is not None:
                report.results[i] = result
            else:
                report.failures[i] = error
        on_event(PointEvent("measured" if result is not None else "failed", i, spec, result, error or ""))

    def worker() -> None:
        tracker, session = tracker_of(backend), None
        try:
            while True:
                try:
                    i, point, attempts = todo.get_nowait()
                except queue.Empty:
                    return
                spec = point.spec if isinstance(point, ResolvedSpec) else point
                try:
                    if not isinstance(point, ResolvedSpec):
                        point = resolve.layer(point, info.cores)
                    if store is not None and not retune and (hit := lookup(point, store, backend)) is not None:
                        done(i, spec, hit, None)
                        continue
                    if session is None:
                        session = request_server(backend, tracker)
                    done(i, spec, run_on(RemoteDevice(session, info), point, store, retune=retune), None)
                except DeviceLost as e:
                    session = None  # this server is gone (or going): ask the tracker for another
                    with lock:
                        report.retried.append(f"{spec.label()} at {spec.sparsity:g}: {e}")
                    if attempts + 1 < max_attempts:
                        todo.put((i, point, attempts + 1))
                        on_event(PointEvent("retried", i, spec, message=str(e)))
                        time.sleep(0.5)  # let the tracker notice the lost server before asking again
                    else:
                        done(i, spec, None, f"lost {max_attempts} servers while measuring it; last: {e}")
                except UserError as e:
                    done(i, spec, None, str(e))
                except Exception as e:  # the engine failed on this point: say so, keep the others
                    done(i, spec, None, f"the engine failed: {type(e).__name__}: {e}")
        finally:
            session = None
            gc.collect()  # remote modules and tensors keep the session: free the server for the others now

    total, _ = servers(backend)  # not only the free ones: a server just released re-registers a moment later
    report.workers = max(1, min(total, len(specs)))
    threads = [threading.Thread(target=worker, name=f"rpc-sweep-{n}", daemon=True) for n in range(report.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return report


def stream(specs: list[Spec | ResolvedSpec], backend: Backend, store=None, retune: bool = False) -> Iterator[PointEvent]:
    """`sweep` running in the background; its PointEvents yielded in the caller's thread as they
    happen (a UI can only be updated from its own thread). Errors of the sweep itself re-raise here."""
    events: queue.Queue = queue.Queue()
    failed: list[BaseException] = []

    def go() -> None:
        try:
            sweep(specs, backend, store, retune, on_event=events.put)
        except BaseException as e:  # re-raised in the caller's thread
            failed.append(e)
        finally:
            events.put(None)

    threading.Thread(target=go, name="rpc-sweep", daemon=True).start()
    while (event := events.get()) is not None:
        yield event
    if failed:
        raise failed[0]
