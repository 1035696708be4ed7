"""Long jobs that outlive the page: a queue on disk, one worker process, one job at a time.

A job is a frozen request, `kind` (a name in JOB_KINDS) plus its JSON-able `request` dict (for
"model", a resolved plan as `ResolvedPlan.to_dict()`), with an id. Its state is one JSON file,
`<cache dir>/jobs/<id>.json`, always replaced whole (temp file + os.replace) under `jobs.lock`:

    {"id": 32 hex digits, "kind": str, "request": dict, "key": sha256 of kind + request,
     "state": "queued" | "running" | "done" | "failed" | "cancelled",
     "submitted" / "started" / "finished": unix seconds or None,
     "progress": [{"step": str, "detail": str, "fraction": float in [0, 1] or None, "time": unix s}, ...]
                 (the last MAX_PROGRESS lines),
     "owner": sha256 hex of the submitter's token (only its holder may cancel),
     "result_key": the stored result's key (state done), "error": one line (state failed),
     "cancel": true once cancelling a running job was asked, "worker_pid" / "runner_pid": int or None}

Submitting (`submit`) validates the request, returns the stored result's key at once when there is
one (no job), returns the queued or running job of the same request if there is one (no second
job), else writes a queued job and makes sure a worker runs: `python -m sparsity_app worker`,
spawned detached (its own session, so it outlives the Streamlit session and the server's reruns).
The worker holds `jobs/worker.lock` while it lives, takes queued jobs oldest first, runs each in a
forked child it can kill, and exits when the queue is empty. Every kind's compute holds
`locks.measurement_slot` while it measures, so jobs, the CLI and the app never time at once.

Cancelling a queued job marks it cancelled (it never runs); cancelling a running one sends its
child SIGTERM (raised as an exception inside it, so the measurement slot is released and logged),
SIGKILL after CANCEL_GRACE_S, and marks it cancelled. The store writes each result in one SQLite
transaction, so a killed child leaves either the whole result or none of it; the tuner's winners
stored before the kill are complete entries and are reused by the next run. A worker killed
outright (kill -9) takes its child with it (PR_SET_PDEATHSIG on Linux); the next look at the
queue (`refresh`, called by `status`, `submit` and `list_jobs`) marks the job failed with a
message, and starts a worker again if jobs are still queued.

Job kinds (the registry contract). A kind is `JobKind(run, stored)`, one line in JOB_KINDS:

    stored(request: dict, store: Store) -> str | None
        Cheap (no measuring): raise UserError for an invalid request; return the store key of
        its result if it is already stored, else None. Called by `submit`, in the caller's process.
    run(request: dict, progress: Progress, store: Store) -> str
        The computation, in the worker's child process; holds locks.measurement_slot while it
        measures; stores its result in `store` and returns its key. progress(step, detail,
        fraction=None) adds a line the page shows (e.g. recovery: step "train", detail
        "step 120/400, loss 0.412, 2 min left", fraction 0.3); call it at most a few times a
        second. It needs no cancel check: cancelling kills the child.

The caller reads the result through its own store namespace (for "model": Store.get_model_result).
Extra kinds for tests (or a private install) come from the module named by the operator's
$SPARSITY_APP_JOB_KINDS_MODULE, imported on first use to add entries to JOB_KINDS; it is never
taken from a request.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import hmac
import importlib
import json
import multiprocessing
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import traceback
import uuid
from typing import Any, Callable, Iterator, Protocol

from filelock import FileLock, Timeout

from sparsity_app.core import limits
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ResolvedPlan, ResolvedRecovery
from sparsity_app.core.store import Store, cache_dir
from sparsity_app.runs.model import key_of as model_key, run_model
from sparsity_app.runs.recover import recover, recovery_machine

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
MAX_PROGRESS = 200  # progress lines kept per job (a recovery run may report hundreds of steps)
MAX_QUEUED = 32  # queued jobs on one machine; one more is refused with a message
KEEP_FINISHED_S = 7 * 24 * 3600  # finished job files older than this are removed on submit
CANCEL_GRACE_S = 10.0  # after SIGTERM, how long a running job may take to stop before SIGKILL
POLL_S = 0.25  # how often the worker looks at its child and at the job file
_ID = re.compile(r"[0-9a-f]{32}")
_ROOT = pathlib.Path(__file__).resolve().parents[2]


class Progress(Protocol):
    def __call__(self, step: str, detail: str, fraction: float | None = None) -> None: ...


@dataclasses.dataclass(frozen=True)
class JobKind:
    """What a job kind does; see the module docstring for the contract."""

    run: Callable[[dict, Progress, Store], str]  # measure and store; returns the result's store key
    stored: Callable[[dict, Store], "str | None"]  # validate; the stored result's key, or None


@dataclasses.dataclass(frozen=True)
class Job:
    """One job's state as read from its file (see the module docstring for each field)."""

    id: str
    kind: str
    request: dict
    key: str
    state: str
    submitted: float
    owner: str
    started: float | None = None
    finished: float | None = None
    progress: tuple[dict, ...] = ()
    result_key: str | None = None
    error: str | None = None
    cancel: bool = False
    worker_pid: int | None = None
    runner_pid: int | None = None
    position: int | None = None  # queued: how many jobs run before it (the running one included); not stored

    def owned_by(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.owner, _hash(token))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("position")
        d["progress"] = list(self.progress)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Job":
        fields = {f.name for f in dataclasses.fields(cls)} - {"position"}
        return cls(**{**{k: v for k, v in d.items() if k in fields}, "progress": tuple(d.get("progress", ()))})


@dataclasses.dataclass(frozen=True)
class Submitted:
    """What `submit` did: the job (queued, or the same request's queued/running one), or the stored result's key."""

    job: Job | None  # None when the result was already stored: nothing was queued
    result_key: str | None  # the stored result's key when it was


# ---- the "model" kind: a whole pruned model, runs.model.run_model
# A request is what the page resolved, in its one serialised form (ResolvedPlan.to_dict): the worker
# reads it back and never validates it again.

def plan_of(request: dict) -> ResolvedPlan:
    """The resolved plan of a "model" request dict; UserError for a dict that is not one."""
    try:
        return ResolvedPlan.from_dict(request)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"not a whole-model plan (a resolved one, as a page submits it): {e}") from None


def _model_stored(request: dict, store: Store) -> str | None:
    key = model_key(plan_of(request).plan)
    return key if store.get_model_result(key) is not None else None


def _model_run(request: dict, progress: Progress, store: Store) -> str:
    resolved = plan_of(request)
    run_model(resolved, store=store, progress=progress)
    return model_key(resolved.plan)


# ---- the "recover" kind: runs.recover.recover, then the whole model on one-shot and on recovered weights

def recovery_request(recovery: ResolvedRecovery, plan: ResolvedPlan) -> dict:
    """A resolved recovery and the resolved plan to time it with (tokens, batch, ...) as a request dict."""
    return {"recovery": recovery.to_dict(), "plan": plan.to_dict()}


def _recovery_of(request: dict) -> tuple[ResolvedRecovery, ResolvedPlan]:
    try:
        recovery, plan = ResolvedRecovery.from_dict(request["recovery"]), ResolvedPlan.from_dict(request["plan"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"not a recovery request (a resolved one, as a page submits it): {e}") from None
    r = recovery.request
    limits.current().check_recovery(r.steps * r.batch * r.seq_len)  # refused at submit
    return recovery, plan


def _recover_stored(request: dict, store: Store) -> str | None:
    recovery, plan = _recovery_of(request)
    done = store.get_recovery(recovery.request.key(recovery_machine()))
    if done is None:
        return None
    key = model_key(plan.plan, done)
    return key if store.get_model_result(key) is not None else None


def _recover_run(request: dict, progress: Progress, store: Store) -> str:
    recovery, plan = _recovery_of(request)
    done = recover(recovery, store=store, progress=progress)
    run_model(plan, store=store, progress=progress)  # the one-shot twin: where the page's arrow starts
    run_model(plan, store=store, progress=progress, recovery=done)
    return _recover_stored(request, store)


JOB_KINDS: dict[str, JobKind] = {
    "model": JobKind(run=_model_run, stored=_model_stored),
    "recover": JobKind(run=_recover_run, stored=_recover_stored),
}
_extra_loaded = False


def kind(name: str) -> JobKind:
    """The registered kind `name`; UserError listing the known kinds otherwise."""
    global _extra_loaded
    if not _extra_loaded and os.environ.get("SPARSITY_APP_JOB_KINDS_MODULE"):
        importlib.import_module(os.environ["SPARSITY_APP_JOB_KINDS_MODULE"])  # the operator's, never a request's
        _extra_loaded = True
    if name not in JOB_KINDS:
        raise UserError(f"unknown job kind {name!r}; known kinds: {', '.join(JOB_KINDS)}")
    return JOB_KINDS[name]


# ---- the queue on disk

def jobs_dir(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """<cache dir>/jobs (created on first use)."""
    d = cache_dir(directory) / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _lock(d: pathlib.Path) -> FileLock:
    return FileLock(str(d / "jobs.lock"), thread_local=False, is_singleton=False)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def request_key(kind_name: str, request: dict) -> str:
    return hashlib.sha256(json.dumps({"kind": kind_name, "request": request}, sort_keys=True).encode()).hexdigest()


def check_id(job_id: object) -> str:
    """job_id if it is a job id (32 hex digits), else UserError: a link's ?job= never becomes any other path."""
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise UserError(f"{job_id!r} is not a job id (32 hex digits)")
    return job_id


def _path(d: pathlib.Path, job_id: str) -> pathlib.Path:
    return d / f"{check_id(job_id)}.json"


def _read(path: pathlib.Path) -> Job | None:
    try:
        return Job.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # gone, or unreadable: treated as no such job
        return None


def _write(d: pathlib.Path, job: Job) -> None:
    path = _path(d, job.id)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(job.to_dict()))
    os.replace(tmp, path)


def _all(d: pathlib.Path) -> list[Job]:
    jobs = [job for p in d.glob("*.json") if (job := _read(p)) is not None]
    return sorted(jobs, key=lambda j: j.submitted)


def _with_positions(jobs: list[Job]) -> list[Job]:
    ahead = sum(j.state == "running" for j in jobs)
    out = []
    for j in jobs:
        if j.state == "queued":
            j = dataclasses.replace(j, position=ahead)
            ahead += 1
        out.append(j)
    return out


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running anything
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _update(d: pathlib.Path, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
    """Read-modify-write one job under the queue's lock; change returns the new state (None: leave it)."""
    with _lock(d):
        job = _read(_path(d, job_id))
        if job is None:
            return None
        new = change(job)
        if new is not None and new != job:
            _write(d, new)
            return new
        return job


def refresh(directory: str | os.PathLike | None = None) -> None:
    """Mend what a killed worker left: its running job is marked failed; queued jobs get a worker."""
    d = jobs_dir(directory)
    with _lock(d):
        jobs = _all(d)
        for job in jobs:
            if job.state == "running" and not _alive(job.worker_pid) and not _alive(job.runner_pid):
                _write(d, dataclasses.replace(
                    job, state="failed", finished=time.time(),
                    error="the worker running this job stopped before it finished (killed or crashed); submit it again"))
    if any(j.state == "queued" for j in jobs):
        ensure_worker(directory)


def submit(kind_name: str, request: dict, owner_token: str, directory: str | os.PathLike | None = None) -> Submitted:
    """Queue `request` as a job of kind `kind_name` unless its result is stored or it is already queued/running.

    Raises UserError for an unknown kind, an invalid request, or a full queue.
    """
    job_kind = kind(kind_name)
    request = json.loads(json.dumps(request))  # frozen: the job keeps its own JSON copy
    store = Store(directory)
    try:
        if (stored := job_kind.stored(request, store)) is not None:
            return Submitted(job=None, result_key=stored)
    finally:
        store.close()
    d, key, now = jobs_dir(directory), request_key(kind_name, request), time.time()
    with _lock(d):
        jobs = _all(d)
        for job in jobs:
            if job.key == key and job.state in ("queued", "running"):
                return Submitted(job=_with_positions(jobs)[jobs.index(job)], result_key=None)
        if sum(j.state == "queued" for j in jobs) >= MAX_QUEUED:
            raise UserError(f"the job queue is full ({MAX_QUEUED} jobs waiting); try again when some have finished")
        for job in jobs:
            if job.state in FINISHED and (job.finished or job.submitted) < now - KEEP_FINISHED_S:
                _path(d, job.id).unlink(missing_ok=True)
        job = Job(id=uuid.uuid4().hex, kind=kind_name, request=request, key=key, state="queued", submitted=now,
                  owner=_hash(owner_token))
        _write(d, job)
        jobs = _all(d)
    ensure_worker(directory)
    return Submitted(job=next(j for j in _with_positions(jobs) if j.id == job.id), result_key=None)


def stored(kind_name: str, request: dict, directory: str | os.PathLike | None = None) -> str | None:
    """The stored result's key of the request, or None (UserError for an invalid request)."""
    store = Store(directory)
    try:
        return kind(kind_name).stored(json.loads(json.dumps(request)), store)
    finally:
        store.close()


def in_flight(kind_name: str, request: dict, directory: str | os.PathLike | None = None) -> bool:
    """Whether the same request is queued or running now (submitting it again joins that job)."""
    key = request_key(kind_name, json.loads(json.dumps(request)))
    return any(j.key == key and j.state in ("queued", "running") for j in _all(jobs_dir(directory)))


def status(job_id: str, directory: str | os.PathLike | None = None) -> Job | None:
    """The job's current state with its queue position (None: no such job). Mends a dead worker first."""
    d = jobs_dir(directory)
    path = _path(d, job_id)  # UserError for anything that is not an id, before touching the disk
    refresh(directory)
    if not path.exists():
        return None
    return next((j for j in _with_positions(_all(d)) if j.id == job_id), None)


def list_jobs(directory: str | os.PathLike | None = None) -> list[Job]:
    """Every job on disk, oldest first, queued ones with their position."""
    refresh(directory)
    return _with_positions(_all(jobs_dir(directory)))


def cancel(job_id: str, owner_token: str | None, directory: str | os.PathLike | None = None,
           force: bool = False) -> Job:
    """Cancel a queued or running job; only with the submitter's token (force: the operator, from the CLI).

    A queued job is cancelled at once; a running one is stopped by its worker within a few seconds
    (status() shows state "cancelled" then). Raises UserError if the job does not exist, is not
    the caller's, or has already finished.
    """
    d = jobs_dir(directory)
    problem: list[str] = []

    def change(job: Job) -> Job | None:
        if not force and not job.owned_by(owner_token):
            problem.append("only the session that submitted this job can cancel it")
        elif job.state in FINISHED:
            problem.append(f"the job has already finished ({job.state})")
        elif job.state == "queued":
            return dataclasses.replace(job, state="cancelled", finished=time.time(), cancel=True)
        else:
            return dataclasses.replace(job, cancel=True)
        return None

    job = _update(d, job_id, change)
    if job is None:
        raise UserError(f"no job {job_id}")
    if problem:
        raise UserError(problem[0])
    return job


# ---- the worker

def ensure_worker(directory: str | os.PathLike | None = None) -> None:
    """Start a detached worker unless one holds the worker lock, or one started by an earlier call is
    still starting (it takes a few seconds to import; a spare one started in a race exits at once)."""
    d = jobs_dir(directory)
    probe = FileLock(str(d / "worker.lock"), thread_local=False, is_singleton=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return  # a worker lives; it looks at the queue again before it leaves
    probe.release()
    started = d / "worker.started"  # the pid of the last worker started here
    try:
        if _alive(int(started.read_text())):
            return  # it is starting (or just leaving, after a last look at the queue)
    except (OSError, ValueError):
        pass
    log = open(d / "worker.log", "ab")
    try:
        worker = subprocess.Popen([sys.executable, "-m", "sparsity_app", "worker", "--cache-dir",
                                   str(cache_dir(directory))],
                                  cwd=_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        started.write_text(str(worker.pid))
    finally:
        log.close()


def work(directory: str | os.PathLike | None = None) -> int:
    """The worker's loop: run queued jobs one at a time, oldest first, until none is left. Returns how many ran."""
    d = jobs_dir(directory)
    lock = FileLock(str(d / "worker.lock"), thread_local=False, is_singleton=False)
    try:
        lock.acquire(timeout=2)  # not 0: a page's probe (ensure_worker) may hold it for an instant
    except Timeout:
        return 0  # another worker has the queue
    ran = 0
    try:
        while True:
            job = _take(d)
            if job is None:
                # Leave, then look once more: a job queued while we held the lock saw a live worker.
                lock.release()
                if not any(j.state == "queued" for j in _all(d)):
                    return ran
                try:
                    lock.acquire(timeout=2)
                except Timeout:
                    return ran  # a new worker took over
                continue
            _run_one(d, job, directory)
            ran += 1
    finally:
        if lock.is_locked:
            lock.release()


def _take(d: pathlib.Path) -> Job | None:
    with _lock(d):
        queued = [j for j in _all(d) if j.state == "queued"]
        if not queued:
            return None
        job = dataclasses.replace(queued[0], state="running", started=time.time(), worker_pid=os.getpid())
        _write(d, job)
        return job


def _run_one(d: pathlib.Path, job: Job, directory) -> None:
    child = multiprocessing.get_context("fork").Process(target=_child, args=(str(d), job.id, directory, os.getpid()))
    child.start()
    _update(d, job.id, lambda j: dataclasses.replace(j, runner_pid=child.pid))
    asked_at = None
    while child.is_alive():
        child.join(POLL_S)
        current = _read(_path(d, job.id))
        if current is not None and current.cancel and child.is_alive():
            if asked_at is None:
                asked_at = time.monotonic()
                os.kill(child.pid, signal.SIGTERM)
            elif time.monotonic() - asked_at > CANCEL_GRACE_S:
                child.kill()
    child.join()

    def finish(j: Job) -> Job | None:
        if j.state != "running":
            return None  # the child wrote its outcome
        if j.cancel:
            return dataclasses.replace(j, state="cancelled", finished=time.time())
        return dataclasses.replace(j, state="failed", finished=time.time(),
                                   error=f"the job's process ended unexpectedly (exit code {child.exitcode})")
    _update(d, job.id, finish)


class _Cancelled(BaseException):
    """Raised in a job's child by SIGTERM: unwinds (releasing the measurement slot), stores nothing more."""


def _child(d_text: str, job_id: str, directory, parent: int) -> None:
    d = pathlib.Path(d_text)
    _die_with_parent(parent)

    def on_term(signum, frame):
        raise _Cancelled()

    signal.signal(signal.SIGTERM, on_term)
    job = _read(_path(d, job_id))

    last: list[tuple] = [()]

    def progress(step: str, detail: str, fraction: float | None = None) -> None:
        fraction = None if fraction is None else min(max(float(fraction), 0.0), 1.0)
        if (step, detail, fraction) == last[0]:
            return  # e.g. the measurement slot's "waiting: 2 ahead", told every 0.25 s: one line until it changes
        last[0] = (step, detail, fraction)
        line = {"step": str(step), "detail": str(detail), "time": time.time(), "fraction": fraction}
        _update(d, job_id, lambda j: dataclasses.replace(j, progress=(*j.progress, line)[-MAX_PROGRESS:]))

    try:
        store = Store(directory)
        try:
            key = kind(job.kind).run(job.request, progress, store)
        finally:
            store.close()
        outcome = dict(state="done", result_key=key)
    except _Cancelled:
        return  # the worker marks it cancelled
    except UserError as e:
        outcome = dict(state="failed", error=str(e))
    except Exception as e:  # the engine failed: one line for the page, the trace in worker.log

        traceback.print_exc()
        outcome = dict(state="failed", error=f"the engine failed: {type(e).__name__}: {e}")
    _update(d, job_id, lambda j: dataclasses.replace(j, finished=time.time(), **outcome))


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when the worker dies (kill -9 included)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:  # the worker died before the line above
        os._exit(1)


def iter_progress(job: Job) -> Iterator[str]:
    """The job's progress lines as text, oldest first: 'step: detail (42%)'."""
    for line in job.progress:
        frac = "" if line.get("fraction") is None else f" ({line['fraction']:.0%})"
        yield f"{line['step']}: {line['detail']}{frac}"
