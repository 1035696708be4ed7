"""One measurement at a time on this machine, across threads and processes.

Two timings on 2 cores at once slow each other down and both report a wrong speedup, so every
computation that measures (a layer's run, a whole model's) holds `measurement_slot` from its first
compile to its last timing. Waiters take a numbered ticket in the cache directory, so a page can
say "2 ahead of you"; cached results never wait. Each hold is appended to `measure.log`
(start, end, who) so that overlaps can be checked after the fact.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import threading
import time
from typing import Callable, Iterator

from filelock import FileLock, Timeout

_POLL_S = 0.5


def _ticket_dir(directory: pathlib.Path) -> pathlib.Path:
    d = directory / "queue"
    d.mkdir(parents=True, exist_ok=True)
    return d


def queue_length(directory: str | os.PathLike) -> int:
    """How many live computations hold or wait for the measurement slot of this cache directory."""
    return sum(_alive(int(t.name.split("-")[1])) for t in _ticket_dir(pathlib.Path(directory)).glob("*.ticket"))


@contextlib.contextmanager
def measurement_slot(directory: str | os.PathLike, who: str,
                     waiting: Callable[[int], None] = lambda ahead: None) -> Iterator[None]:
    """Hold the machine's measurement slot (a file lock under `directory`) for the body.

    waiting(ahead) is called while queued, with the number of computations ahead of this one.
    A ticket left by a killed process (its pid gone) is ignored and removed.
    """
    directory = pathlib.Path(directory)
    tickets = _ticket_dir(directory)
    ticket = tickets / f"{time.time_ns():020d}-{os.getpid()}-{threading.get_ident()}.ticket"
    ticket.write_text(who)
    lock = FileLock(str(directory / "measure.lock"), thread_local=False, is_singleton=False)
    try:
        while True:
            try:
                lock.acquire(timeout=_POLL_S)
                break
            except Timeout:
                waiting(_ahead(tickets, ticket))
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            with open(directory / "measure.log", "a") as log:
                log.write(json.dumps({"start": start, "end": end, "who": who, "pid": os.getpid()}) + "\n")
            lock.release()
    finally:
        ticket.unlink(missing_ok=True)


def _ahead(tickets: pathlib.Path, mine: pathlib.Path) -> int:
    ahead = 0
    for t in sorted(tickets.glob("*.ticket")):
        if t.name >= mine.name:
            break
        pid = int(t.name.split("-")[1])
        if _alive(pid):
            ahead += 1
        else:
            t.unlink(missing_ok=True)  # left by a killed process
    return ahead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holds(directory: str | os.PathLike) -> list[dict]:
    """Every recorded hold of the slot (start, end, who, pid), oldest first."""
    path = pathlib.Path(directory) / "measure.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
