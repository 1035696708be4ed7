"""One measurement at a time on this machine, across threads, processes and cache directories.

Two timings on 2 cores at once slow each other down and both report a wrong speedup, so every
computation that measures (a layer's run, a whole model's, the benchmarks) holds `measurement_slot`
from its first compile to its last timing. The slot lives in one directory per machine
(`lock_dir()`: $SPARSITY_APP_LOCK_DIR, else sparsity-app-measure under the system's temp dir), so
the app, the CLI and the benchmarks share it whatever cache each uses. Waiters take a ticket and
are served strictly in ticket order, so "2 ahead of you" stays true; cached results never wait.
Each hold is appended to `measure.log` (start, end, who) so that overlaps can be checked.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
import threading
import time
from typing import Callable, Iterator

from filelock import FileLock

_POLL_S = 0.25


def lock_dir() -> pathlib.Path:
    """The machine's measurement-slot directory (created on first use)."""
    d = pathlib.Path(os.environ.get("SPARSITY_APP_LOCK_DIR") or pathlib.Path(tempfile.gettempdir()) / "sparsity-app-measure")
    (d / "queue").mkdir(parents=True, exist_ok=True)
    return d


def queue_length() -> int:
    """How many live computations hold or wait for the measurement slot."""
    return sum(_alive(t) for t in (lock_dir() / "queue").glob("*.ticket"))


@contextlib.contextmanager
def measurement_slot(who: str, waiting: Callable[[int], None] = lambda ahead: None) -> Iterator[None]:
    """Hold the machine's measurement slot for the body, after every older live ticket.

    waiting(ahead) is called while queued, with the number of computations ahead of this one.
    A ticket left by a killed process (its pid gone) is ignored and removed.
    """
    directory = lock_dir()
    ticket = directory / "queue" / f"{time.time_ns():020d}-{os.getpid()}-{threading.get_ident()}.ticket"
    ticket.write_text(who)
    lock = FileLock(str(directory / "measure.lock"), thread_local=False, is_singleton=False)
    try:
        while (ahead := _ahead(ticket)) > 0:  # first come, first served: wait for every older ticket
            waiting(ahead)
            time.sleep(_POLL_S)
        with lock:  # the oldest ticket: the lock is free or about to be (its holder is leaving)
            start = time.time()
            try:
                yield
            finally:
                with open(directory / "measure.log", "a") as log:
                    log.write(json.dumps({"start": start, "end": time.time(), "who": who, "pid": os.getpid()}) + "\n")
    finally:
        ticket.unlink(missing_ok=True)


def _ahead(mine: pathlib.Path) -> int:
    ahead = 0
    for t in sorted(mine.parent.glob("*.ticket")):
        if t.name >= mine.name:
            break
        if _alive(t):
            ahead += 1
        else:
            t.unlink(missing_ok=True)  # left by a killed process
    return ahead


def _alive(ticket: pathlib.Path) -> bool:
    try:
        os.kill(int(ticket.name.split("-")[1]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def holds() -> list[dict]:
    """Every recorded hold of the slot (start, end, who, pid), oldest first."""
    path = lock_dir() / "measure.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
