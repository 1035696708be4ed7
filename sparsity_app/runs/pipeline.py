"""The skeleton every run shares (layer, whole model, recovery, sensitivity).

A run tells `progress` as each of its steps begins (`StepClock`, which also keeps each step's wall
time for the result's `step_s`), and goes through one sequence (`cached_or_run`):

    stored? -> take the measurement slot -> stored now (by the run we waited for)? -> time limit
    -> run -> store

so no two measurements on this machine overlap, a result is never measured twice, and a run that
outlasts its limit stops between steps (core.limits).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Iterator, TypeVar

from sparsity_app.core import limits
from sparsity_app.core.results import REMEASURE

Progress = Callable[[str, str], None]  # (step, one-line detail)
R = TypeVar("R")


def quiet(step: str, detail: str) -> None:
    """A Progress that tells no one."""


class StepClock:
    """Tells `progress` as each step begins and keeps its wall time (seconds, by step name)."""

    def __init__(self, progress: Progress, steps: tuple[str, ...]):
        self.progress, self.seconds, self.steps = progress, {}, steps

    @contextlib.contextmanager
    def step(self, name: str, detail: str) -> Iterator[None]:
        assert name in self.steps
        limits.check_time(f"step {name!r}")
        self.progress(name, detail)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 4)


def cached_or_run(who: str, lookup: Callable[[], R | None] | None, run: Callable[[], R],
                  slot: Callable[..., ContextManager], progress: Progress = quiet,
                  time_limit: str | None = None, store: Callable[[R], None] | None = None,
                  waiting: str = "measurement(s)", admit: Callable[[], None] | None = None) -> R:
    """The stored result, else `run()` inside the measurement slot (and `store`d).

    who: names the run in the slot's queue. lookup: the stored result or None (None: never reuse).
    slot: (who, waiting=callback(ahead)) -> context manager (locks.measurement_slot, or a device's).
    time_limit: the Limits field that bounds the run from its first step, not while queued.
    admit: raises if this server will not measure the request (a stored result is served all the same).
    """
    if lookup is not None and (hit := lookup()) is not None:
        return hit
    if admit is not None:
        admit()
    with slot(who, waiting=lambda ahead: progress("queue", f"waiting: {ahead} {waiting} ahead of this one")):
        if lookup is not None and (hit := lookup()) is not None:
            return hit  # measured by the one we waited for
        with limits.time_limit(time_limit) if time_limit else contextlib.nullcontext():
            result = run()
        if store is not None:
            store(result)  # inside the slot: whoever waits for it finds it stored
    return result


def measure_until_sound(time_once: Callable[[], R], judge: Callable[[R], str | None], progress: Progress = quiet
                        ) -> tuple[R, str | None]:
    """(figures, None) from the first of up to 1 + REMEASURE calls of `time_once` whose figures `judge`
    finds sound; else the last call's figures and why they are noise (stored and shown marked, and
    kept out of every verdict)."""
    for attempt in range(REMEASURE + 1):
        figures = time_once()
        noisy = judge(figures)
        if noisy is None:
            return figures, None
        if attempt < REMEASURE:
            progress("time", f"measuring again ({attempt + 1} of {REMEASURE}): {noisy}")
    return figures, noisy
