"""What every page shares: the result store, the engine call with live steps, the conditions line, and
the one check of a request (runs.resolve), memoised per process: a page re-executes on every rerun,
and a request that did not change is not checked again (nor is a link read twice)."""
from __future__ import annotations

import functools

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from sparsity_app import Spec, UserError
from sparsity_app.core.errors import one_line
from sparsity_app.core.limits import RATE_LIMITER
from sparsity_app.core.requests import (PRECISIONS, ModelPlan, RecoveryRequest, ResolvedPlan, ResolvedRecovery,
                                        ResolvedSpec)
from sparsity_app.core.results import ALL_DENSE_PEERS
from sparsity_app.core.store import Store, cache_dir
from sparsity_app.measure.backend import LOCAL, Backend
from sparsity_app.prune.methods import METHODS
from sparsity_app.runs import resolve, sweep
from sparsity_app.runs.layer import lookup, run
from sparsity_app.serve.links import escape, spec_from_query

# What the method selectors and the seed inputs say, from the method registry
METHOD_HELP = "  \n".join(f"**{name}**: {method.label}" for name, method in METHODS.items())
# which methods read each pattern field, for the selectors' labels
NM_METHODS = ", ".join(name for name, m in METHODS.items() if m.needs_nm or m.takes_nm)
BLOCK_METHODS = ", ".join(name for name, m in METHODS.items() if m.takes_block)
SPARSITY_METHODS = ", ".join(name for name, m in METHODS.items() if not m.needs_nm)
PRECISION_HELP = ("what the kernels compute in: " + "; ".join(f"{name}: {text}" for name, text in PRECISIONS.items())
                  + ". INT8 runs blocks with a multiple of 4 input columns (16x4, 32x4, 1x4, ...): the CPU's "
                  "integer dot sums four products of consecutive inputs per lane; its dense peers include "
                  "dense INT8 (ours and PyTorch's dynamic quantization).")
SEED_LABEL = "Seed"
SEED_HELP = ("what a method that draws reads: " +
             "; ".join(f"{name}'s {'calibration draw' if m.reconstructs else 'random pattern'}"
                       for name, m in METHODS.items() if m.takes_seed) + ". Other methods ignore it.")


@functools.lru_cache(maxsize=512)
def resolved_spec(spec: Spec, cores: int | None = None) -> ResolvedSpec:
    """resolve.layer, once per distinct Spec (and device's cores) in this process; a UserError is
    raised every time."""
    return resolve.layer(spec, cores)


def resolved_on(spec: Spec, backend: Backend) -> ResolvedSpec:
    """The spec resolved against the cores of the device it is measured on."""
    return resolved_spec(spec, None if backend.kind == "local" else sweep.probe(backend).cores)


@functools.lru_cache(maxsize=256)
def resolved_plan(plan: ModelPlan) -> ResolvedPlan:
    """resolve.plan, once per distinct plan in this process."""
    return resolve.plan(plan)


@functools.lru_cache(maxsize=256)
def resolved_recovery(request: RecoveryRequest, plan: ResolvedPlan | None = None) -> ResolvedRecovery:
    """resolve.recovery, once per distinct request (and its resolved plan) in this process."""
    return resolve.recovery(request, plan)


@st.cache_resource
def _store(directory: str) -> Store:
    return Store(directory)


def store() -> Store:
    """The result store of the configured cache directory, opened once per directory."""
    return _store(str(cache_dir()))


def run_with_status(spec: Spec, retune: bool = False, backend: Backend = LOCAL):
    """Run the engine inside st.status, one line per step; a cached result appears at once.

    Returns the Result, or None after showing the error on the page. A run that will measure
    counts against this session's rate limit; a cached one never does.
    """
    try:
        point = resolved_on(spec, backend)  # the page's one check: the lookup and the run take it
        if retune or lookup(point, store(), backend) is None:
            RATE_LIMITER.take(session_id(), 1)
        with st.status(f"Running {spec.label()} at sparsity {spec.sparsity:g} on {backend.label()}...",
                       expanded=True) as status:
            shown = []

            def show(step: str, detail: str) -> None:  # the slot says "waiting: 2 ahead" every 0.25 s: once per change
                if shown[-1:] != [(step, detail)]:
                    shown.append((step, detail))
                    status.write(f"**{step}**: {detail}")
            result = run(point, store=store(), progress=show, retune=retune, backend=backend)
            status.update(label="Loaded from the cache" if result.cached else "Measured", state="complete",
                          expanded=False)
        return result
    except UserError as e:
        st.error(escape(one_line(e, 600)))
    except Exception as e:  # the engine failed: say so on the page, keep the app alive
        st.error(escape(f"The engine failed: {type(e).__name__}: {one_line(e)}"))
    return None


def session_id() -> str:
    """This browser session's id (what the rate limit counts against)."""
    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else "no-session"


def conditions(result) -> str:
    """One caption stating how `result` was measured."""
    m, best = result.machine, result.best_dense
    where = "" if result.device == "this machine" else \
        f"{result.device} (PyTorch not measured there: speedups are against TVM dense on the device); "
    return (f"Measured on {where}{m.get('cpu')} ({result.kernel.get('mcpu', '?')}, {', '.join(m.get('isa', [])[-3:])}), "
            f"{result.spec.threads} threads, TVM {m.get('tvm')}, " + (f"PyTorch {m['torch']}, " if m.get("torch") else "")
            + f"code {str(m.get('code'))[:8]}, "
            f"{result.spec.tokens} tokens timed, {PRECISIONS[result.spec.precision]}. Median of {result.spec.repeat} "
            "samples; spread = "
            f"interquartile range. Best dense = fastest of {len([k for k in ALL_DENSE_PEERS if k in result.times_ms])} "
            f"dense peers timed in the same measurement: {ALL_DENSE_PEERS[best]}.")


def query_spec(default: Spec = Spec()) -> Spec:
    """The spec in the URL, with a visible note for each value that fell back to its default."""
    spec, notes = spec_from_query(dict(st.query_params), default, resolved_spec)
    for note in notes:
        st.warning(note, icon=":material/link_off:")
    return spec


def pick_conditions(groups: dict, key: str) -> str | None:
    """A choice between sets of measurement conditions (analysis.by_conditions); the first is the default."""
    if not groups:
        return None
    if len(groups) == 1:
        return next(iter(groups))
    return st.selectbox(f"Measurement conditions ({len(groups)} sets in the cache; results of different sets are "
                        "never mixed)", list(groups), key=key,
                        format_func=lambda k: f"{k} ({len(groups[k])} results)")


def cache_controls() -> None:
    """Sidebar: what the cache holds, and buttons to clear results or tuned schedules."""
    s = store()
    for note in s.notes:  # e.g. an unreadable index kept aside: the app goes on with a fresh one
        st.sidebar.warning(escape(note), icon=":material/warning:")
    with st.sidebar.expander("Cache"):
        st.caption(f"{len(s)} results and {s.tunings()} tuned schedules in `{s.directory}`. Clearing forces every "
                   "figure to be measured (and every schedule tuned) again.")
        if st.button("Clear results", key="clear_results"):
            n, _ = s.clear(results=True, tuning=False)
            st.success(f"Cleared {n} results.")
        if st.button("Clear tuned schedules", key="clear_tuning"):
            _, n = s.clear(results=False, tuning=True)
            st.success(f"Cleared {n} tuned schedules.")


def backend_controls() -> Backend:
    """Sidebar: where kernels are measured, this machine or the servers of a TVM RPC tracker.

    Stops the page with the error when the RPC settings are not valid.
    """
    with st.sidebar.expander("Measure on", expanded=st.session_state.get("backend_kind") == "RPC tracker"):
        kind = st.radio("Device", ["this machine", "RPC tracker"], key="backend_kind",
                        help="RPC: kernels are compiled here for the device, uploaded and timed there "
                             "(see the README's 'Measuring on other devices')")
        if kind == "this machine":
            return LOCAL
        tracker = st.text_input("Tracker (HOST:PORT)", "127.0.0.1:9190", key="backend_tracker")
        key = st.text_input("Device key (the servers' --key)", key="backend_key")
        target = st.text_input("Target (optional)", key="backend_target", placeholder="mtriple=...,mcpu=...",
                               help="empty: the triple and CPU the device reports")
    try:
        return Backend(kind="rpc", tracker=tracker, key=key, target=target).resolve()
    except UserError as e:
        st.error(f"Measure on: {e}")
        st.stop()
