"""The operator's commands: `cache` (what is stored, or clear it), `jobs` (the queue), `worker` (runs it)."""
from __future__ import annotations

import time

from sparsity_app.core.errors import UserError
from sparsity_app.serve import jobs
from sparsity_app.serve.report import open_store


def add_parsers(sub) -> None:
    p = sub.add_parser("cache", help="what the result cache holds, or clear it")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--only", choices=("results", "tuning"), default=None,
                   help="clear only stored results, or only the tuner's winning schedules")
    p.add_argument("--cache-dir", default=None, help="result cache (default cache/ or $SPARSITY_APP_CACHE_DIR)")
    p = sub.add_parser("jobs", help="the job queue of long runs (whole models): list it, or cancel a job")
    p.add_argument("action", choices=("list", "cancel"))
    p.add_argument("id", nargs="?", help="the job to cancel (cancel: the operator may cancel any job)")
    p.add_argument("--cache-dir", default=None, help="result cache (default cache/ or $SPARSITY_APP_CACHE_DIR)")
    p = sub.add_parser("worker", help="(internal) run queued jobs one at a time until none is left")
    p.add_argument("--cache-dir", default=None)


def _cache(args) -> None:

    store = open_store(args.cache_dir)
    if args.action == "clear":
        results, tunings = store.clear(results=args.only != "tuning", tuning=args.only != "results")
        print(f"cleared {results} results and {tunings} tuned schedules from {store.directory}")
    else:
        print(f"{store.directory}: {len(store)} results, {store.tunings()} tuned schedules")


def _jobs(args) -> None:
    if args.action == "cancel":
        if not args.id:
            raise UserError("jobs cancel needs the job's id (see `python -m sparsity_app jobs list`)")
        job = jobs.cancel(args.id, None, args.cache_dir, force=True)
        print(f"{job.id}: {'cancelled' if job.state == 'cancelled' else 'stopping (it was running)'}")
        return
    for job in jobs.list_jobs(args.cache_dir):
        where = f"{job.position} ahead" if job.state == "queued" else (job.error or job.result_key or "")
        last = job.progress[-1]["detail"] if job.progress and job.state == "running" else ""
        print(f"{job.id}  {job.kind:8s} {job.state:9s} {time.strftime('%Y-%m-%d %H:%M', time.localtime(job.submitted))}"
              f"  {where or last}")


def _worker(args) -> None:
    jobs.work(args.cache_dir)


COMMANDS = {"cache": _cache, "jobs": _jobs, "worker": _worker}
