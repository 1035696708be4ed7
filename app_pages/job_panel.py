"""A long job on a page: submit it, then its place in the queue, its progress and (for its owner) a cancel button.

The job runs in the machine's worker (sparsity_app.serve.jobs), not in this session: closing or reloading
the tab leaves it running, and the link (`?job=<id>` beside the request's own parameters) shows its
progress and then its result to anyone who opens it. Only the browser session that submitted it may
cancel it: the owner token lives in st.session_state, which a reload starts afresh, so a reload
keeps the job and the view but loses the cancel button (honest and simple: a token in the URL
would give the right to cancel to everyone the link is shared with).

A page with a long run (see model.py): `submit(kind, request, query)` on Run (its `result_key` when the
result is already stored, else its `job`), `job_in_link()` otherwise, then `show(job_id)`; a done
job's `result_key` reads the result from the page's store.
"""
from __future__ import annotations

import secrets
import time

import streamlit as st

from app_pages.common import session_id
from sparsity_app import UserError
from sparsity_app.core.errors import one_line
from sparsity_app.core.limits import RATE_LIMITER
from sparsity_app.serve import jobs
from sparsity_app.serve.links import escape

POLL_S = 1.0  # how often a watching page reads the job's file


def owner_token() -> str:
    """This browser session's secret; the jobs it submits can be cancelled from it only."""
    if "job_owner" not in st.session_state:
        st.session_state.job_owner = secrets.token_hex(16)
    return st.session_state.job_owner


def submit(kind: str, request: dict, query: dict[str, str]) -> jobs.Submitted:
    """Queue the request (or find its stored result); the link becomes `query` plus ?job=<id>. UserError passes up."""
    if jobs.stored(kind, request) is None and not jobs.in_flight(kind, request):  # a new job: one measurement
        RATE_LIMITER.take(session_id(), 1)
    submitted = jobs.submit(kind, request, owner_token())
    st.query_params.from_dict({**query, **({"job": submitted.job.id} if submitted.job else {})})
    return submitted


def job_in_link() -> str | None:
    """The ?job= of the link, if it is a job id (anything else: a note, and no job)."""
    job_id = st.query_params.get("job")
    if job_id is None:
        return None
    try:
        jobs.check_id(job_id)
    except UserError as e:
        st.warning(escape(f"ignored job={job_id[:40]!r} from the link ({e})"), icon=":material/link_off:")
        return None
    return job_id


def show(job_id: str) -> jobs.Job | None:
    """The job's state on the page, watched live until it finishes (the page reruns then); None if it is gone.

    A failed or cancelled job gets its message here; the caller shows a done job's result.
    """
    job = jobs.status(job_id)
    if job is None:
        st.warning("The job in this link no longer exists (finished jobs are kept for a week). Press Run to measure "
                   "the plan again.")
        return None
    if job.state == "failed":
        st.error(escape(f"The job failed: {one_line(job.error or '', 600)}"))
    elif job.state == "cancelled":
        st.info("This job was cancelled before it finished; nothing of it was stored. Press Run to start it again.")
    if job.state not in jobs.FINISHED:
        _live(job_id)
    return job


@st.fragment(run_every=POLL_S)
def _live(job_id: str) -> None:
    job = jobs.status(job_id)
    if job is None or job.state in jobs.FINISHED:
        st.rerun(scope="app")  # the page shows the outcome
    with st.container(border=True, key="job_panel"):
        if job.state == "queued":
            st.info(f"Queued: {job.position} job(s) ahead of this one on this machine (jobs run one at a time, so "
                    "their timings stay honest). You can close this tab: the link shows the job's progress and result.",
                    icon=":material/hourglass_top:")
        else:
            st.markdown(f"**Running** for {time.time() - (job.started or job.submitted):.0f} s. You can close this "
                        "tab: the link shows the job's progress and then its result.")
            fractions = [line["fraction"] for line in job.progress if line.get("fraction") is not None]
            if fractions:
                st.progress(fractions[-1])
            if job.cancel:
                st.caption("Cancelling...")
        if job.progress:
            st.code("\n".join(list(jobs.iter_progress(job))[-12:]), language=None)
        if job.owned_by(owner_token()) and not job.cancel:
            if st.button("Cancel this job", key="job_cancel", icon=":material/cancel:"):
                try:
                    jobs.cancel(job_id, owner_token())
                except UserError as e:
                    st.error(str(e))
                st.rerun(scope="app")
        else:
            st.caption("Only the browser session that started this job can cancel it.")
