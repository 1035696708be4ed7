"""What one request may ask of a shared machine: sweep size, tokens, measurements per session, cache
size, and how long one measurement may run.

The defaults suit a hosted demo on a small shared CPU; a private install raises (or lifts, with 0)
any of them through environment variables named after the field, e.g.
`SPARSITY_APP_MAX_SWEEP_POINTS=100`. Every limit that stops a request says which limit, its value
and the variable that sets it (`LimitExceeded`, a UserError: the CLI exits 2, the app shows it).

Where each applies: `max_tokens` and the time limits in the engine (`runs.layer.run`,
`runs.model.run_model`), so every door gets them; `max_sweep_points` at the two sweep doors
(the Sweep page, `python -m sparsity_app sweep`); the rate limit in the app, per session
(`RATE_LIMITER.take(session_id, n)`: the CLI has no sessions); `cache_mb` and `weights_mb` in `store.Store`.

The time limit is a deadline checked between the pieces of a measurement (`check_time`): before
each pipeline step, between the tuner's candidate compiles, and after every timed sample. It stops
a runaway tuning or timing within one piece, but cannot cut one piece short: a single TVM compile,
a single kernel call, a whole-model graph compile or the scoring step run to their end first (TVM
cannot be interrupted inside a thread). Nothing of a stopped measurement is stored.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import math
import os
import threading
import time
from typing import Callable, Iterator

from sparsity_app.core.errors import UserError

ENV_PREFIX = "SPARSITY_APP_"


class LimitExceeded(UserError):
    """A request beyond one of this server's limits; the message names the limit and its value."""


class MeasurementTimeout(LimitExceeded):
    """A measurement ran past its time limit and was stopped; nothing of it was stored."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """This server's limits; 0 lifts a limit. Each field is read from SPARSITY_APP_<FIELD IN CAPITALS>."""

    max_sweep_points: int = 24  # points one sweep request may hold (the default sweep is 20)
    max_tokens: int = 512  # rows of X one layer measurement may time (the engine allows up to 4096)
    rate_measurements: int = 30  # uncached measurements one app session may start per rate window
    rate_window_s: float = 900.0  # the rate limit's sliding window, seconds
    cache_mb: float = 384.0  # disk one cache directory may use (results 2/3, schedules and models 1/6 each); least recently used evicted first
    measure_timeout_s: float = 300.0  # wall seconds one layer measurement may take (a cold MiniLM layer: ~45 s on 2 shared cores)
    model_timeout_s: float = 1800.0  # wall seconds one whole-model measurement may take (tuning every layer cold: minutes)
    recovery_tokens: int = 1_000_000  # steps x batch x tokens one recovery run may train on (300 x 16 x 128 = 614400)
    recover_timeout_s: float = 1800.0  # wall seconds of training one recovery run may take (300 steps: ~6 min quiet)
    weights_mb: float = 2048.0  # disk the recovered weights (~53 MB each) and checkpoints (~140 MB) may use; least recently used evicted first

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Limits":
        """The defaults, each replaced by its environment variable where set; UserError for a bad value."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = env_name(field.name)
            raw = environ.get(name, "").strip()
            if not raw:
                continue
            kind = int if field.type in ("int", int) else float
            try:
                value = kind(raw)
            except ValueError:
                value = -1
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"{name} must be a {'whole ' if kind is int else ''}number >= 0 (0 = no limit), "
                                f"got {raw[:40]!r}")
            values[field.name] = value
        return cls(**values)

    def exceeded(self, field: str, what: str) -> LimitExceeded:
        """The error for a request beyond `field`; `what` says what the request asked for."""
        return LimitExceeded(f"{_TITLES[field].format(value=_fmt(getattr(self, field)))}; {what} "
                             f"(limit {field}={_fmt(getattr(self, field))}, set by {env_name(field)})")

    def check_sweep(self, points: int) -> None:
        """LimitExceeded when a sweep of `points` points is too large."""
        if self.max_sweep_points and points > self.max_sweep_points:
            raise self.exceeded("max_sweep_points", f"this sweep has {points}: choose fewer block shapes or sparsities")

    def check_tokens(self, tokens: int) -> None:
        """LimitExceeded when one layer measurement asks for more than max_tokens rows of X."""
        if self.max_tokens and tokens > self.max_tokens:
            raise self.exceeded("max_tokens", f"this request asks for {tokens}")

    def check_recovery(self, tokens: int) -> None:
        """LimitExceeded when one recovery run would train on more than recovery_tokens tokens."""
        if self.recovery_tokens and tokens > self.recovery_tokens:
            raise self.exceeded("recovery_tokens", f"this run asks for {tokens} (steps x batch x sequence length): "
                                                   "choose fewer steps or a smaller batch")

    def cache_bytes(self) -> int:
        """The cache budget in bytes (a very large number when lifted)."""
        return int(self.cache_mb * 2**20) if self.cache_mb else 2**62

    def weights_bytes(self) -> int:
        """The recovered-weights budget in bytes (a very large number when lifted)."""
        return int(self.weights_mb * 2**20) if self.weights_mb else 2**62


_TITLES = {
    "max_sweep_points": "a sweep may measure at most {value} points on this server",
    "max_tokens": "a layer may be timed on at most {value} tokens on this server",
    "measure_timeout_s": "a layer measurement may run at most {value} s on this server",
    "model_timeout_s": "a whole-model measurement may run at most {value} s on this server",
    "recovery_tokens": "a recovery run may train on at most {value} tokens on this server",
    "recover_timeout_s": "a recovery run may train for at most {value} s on this server",
}


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _fmt(value: float) -> str:
    return f"{value:g}"


def current() -> Limits:
    """The limits in force now (read from the environment at each call: cheap, and tests may change it)."""
    return Limits.from_env()


# The rate limit -------------------------------------------------------------------------------------

class RateLimiter:
    """At most `rate_measurements` new measurements per session in any `rate_window_s` (a sliding
    window), for every session of this process. Thread-safe; cached results are never counted (the
    caller takes only what it will measure)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._spent: dict[str, collections.deque[float]] = {}

    def take(self, session: str, n: int = 1, limits: Limits | None = None) -> None:
        """Count `n` measurements against `session`, or raise LimitExceeded (counting none of them)."""
        limits = limits or current()
        if n <= 0 or not limits.rate_measurements or not limits.rate_window_s:
            return
        cap, window = limits.rate_measurements, limits.rate_window_s
        with self._lock:
            now = self._clock()
            spent = self._expire(session, now, window)
            if len(spent) + n > cap:
                if n > cap:
                    when = "ask for fewer at a time"
                else:
                    wait = spent[len(spent) + n - cap - 1] + window - now  # when enough old ones expire
                    when = f"{len(spent)} started in the last {_fmt(window)} s; try again in {math.ceil(wait)} s"
                raise LimitExceeded(f"rate limit: one session may start at most {cap} new measurements per "
                                    f"{_fmt(window)} s on this server; this request needs {n}, {when} (limit "
                                    f"rate_measurements={cap} per rate_window_s={_fmt(window)}, set by "
                                    f"{env_name('rate_measurements')} and {env_name('rate_window_s')})")
            spent.extend([now] * n)
            if len(self._spent) > 1000:  # forget sessions whose window has passed
                for other in list(self._spent):
                    if not self._expire(other, now, window):
                        del self._spent[other]

    def spent(self, session: str, limits: Limits | None = None) -> int:
        """Measurements counted against `session` in the current window."""
        limits = limits or current()
        with self._lock:
            return len(self._expire(session, self._clock(), limits.rate_window_s))

    def _expire(self, session: str, now: float, window: float) -> collections.deque[float]:
        """The session's start times within the window, oldest first (older ones dropped)."""
        spent = self._spent.setdefault(session, collections.deque())
        while spent and spent[0] <= now - window:
            spent.popleft()
        return spent


RATE_LIMITER = RateLimiter()  # the one limiter of this process: every app session served by it


# The time limit of one measurement -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Deadline:
    at: float  # time.monotonic() value past which the measurement stops
    seconds: float
    field: str  # the Limits field that set it


_DEADLINE: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar("measurement_deadline", default=None)


@contextlib.contextmanager
def time_limit(field: str, limits: Limits | None = None) -> Iterator[None]:
    """Within the body (this thread), `check_time` raises MeasurementTimeout once the limit named by
    `field` (measure_timeout_s or model_timeout_s) has passed; 0 = no limit."""
    seconds = getattr(limits or current(), field)
    token = _DEADLINE.set(_Deadline(time.monotonic() + seconds, seconds, field) if seconds else None)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_time(where: str) -> None:
    """Raise MeasurementTimeout if this thread's measurement is past its time limit (else nothing).

    Called between the pieces of a measurement; `where` says which piece comes next.
    """
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline.at:
        raise MeasurementTimeout(
            f"time limit: {_TITLES[deadline.field].format(value=_fmt(deadline.seconds))}; this one was stopped "
            f"before {where}, and nothing of it was stored (limit {deadline.field}={_fmt(deadline.seconds)}, "
            f"set by {env_name(deadline.field)})")
