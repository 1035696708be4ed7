"""Sweep: a grid of patterns x sparsities on one layer; every point is stored as it finishes."""
import streamlit as st

from app_pages.common import (BLOCK_METHODS, METHOD_HELP, NM_METHODS, PRECISION_HELP, SEED_HELP, SEED_LABEL, SPARSITY_METHODS,
                              backend_controls, cache_controls, conditions, query_spec, resolved_spec, session_id,
                              store)
from sparsity_app import Spec, UserError
from sparsity_app.accuracy.proxies import PROXIES
from sparsity_app.core.errors import one_line
from sparsity_app.core.limits import RATE_LIMITER, current as current_limits
from sparsity_app.core.requests import (BLOCK_PRESETS, MAX_TOKENS, NM_PRESETS, NORMS, PRECISIONS, default_threads,
                                        parse_block, parse_nm)
from sparsity_app.model.catalog import MODEL_NAMES, get_model
from sparsity_app.prune.methods import METHODS
from sparsity_app.runs import sweep
from sparsity_app.runs.layer import lookup, run
from sparsity_app.serve import analysis, charts
from sparsity_app.serve.links import escape

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)

st.title("Sweep")
st.caption("Measure patterns x sparsities on one layer. Each point is stored the moment it is measured: "
           "leaving the page or an error loses nothing, and points already measured come from the cache.")
cache_controls()
backend = backend_controls()

start = query_spec()
model_name = st.selectbox("Model", MODEL_NAMES, index=MODEL_NAMES.index(start.model), key="sweep_model")
layers = {l.name: l.shape for l in get_model(model_name).layers()}
with st.form("sweep"):
    c1, c2, c3 = st.columns([3, 1, 1])
    layer = c1.selectbox("Layer", list(layers), index=list(layers).index(start.layer) if start.layer in layers else 0,
                         format_func=lambda n: f"{n}  ({layers[n][0]}x{layers[n][1]})", key="sweep_layer")
    max_tokens = min(current_limits().max_tokens or MAX_TOKENS, MAX_TOKENS)  # this server's limit
    tokens = c2.number_input("Tokens", 1, max_tokens, min(start.tokens, max_tokens), key="sweep_tokens",
                             help=f"rows of X that are timed; at most {max_tokens} on this server")
    threads = c3.number_input("Threads", 1, default_threads(), default_threads(), key="sweep_threads")
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Method", list(METHODS), index=list(METHODS).index("block"), key="sweep_method",
                          help=METHOD_HELP)
    norm = c2.radio("Block score", NORMS, horizontal=True, key="sweep_norm")
    seed = c3.number_input(SEED_LABEL, 0, 2**31 - 1, 0, key="sweep_seed", help=SEED_HELP)
    blocks = st.multiselect(f"Block shapes ({BLOCK_METHODS})",
                            BLOCK_PRESETS, default=["32x1", "16x1", "1x32", "4x4"], key="sweep_blocks")
    nms = st.multiselect(f"N:M patterns ({NM_METHODS})",
                         NM_PRESETS, default=["2:4"], key="sweep_nms")
    precisions = st.multiselect("Precisions", list(PRECISIONS), default=["fp32"], key="sweep_precisions",
                                help=PRECISION_HELP + " Points INT8 cannot run are listed as skipped.")
    sparsities = st.multiselect(f"Sparsities ({SPARSITY_METHODS})",
                                SPARSITIES, default=[0.5, 0.7, 0.8, 0.9, 0.95], key="sweep_sparsities")
    go = st.form_submit_button("Run sweep", type="primary")

chosen = METHODS[method]  # what the method reads decides the grid: blocks (or single weights) and N:M patterns
grid = []
for precision in precisions:
    common = dict(model=model_name, layer=layer, method=method, tokens=int(tokens), threads=int(threads), norm=norm,
                  seed=int(seed), precision=precision)
    grid += [] if chosen.needs_nm else [Spec(**common, block=parse_block(b) if chosen.takes_block else (1, 1), sparsity=s)
                                        for b in (blocks if chosen.takes_block else ["1x1"]) for s in sorted(sparsities)]
    grid += [Spec(**common, nm=parse_nm(v)) for v in nms] if chosen.needs_nm or chosen.takes_nm else []

# This page's one check of each point (on the measuring device's cores): everything below takes `points`.
try:
    cores = None if backend.kind == "local" else sweep.probe(backend).cores
except UserError as e:  # an unreachable tracker
    st.error(escape(one_line(e, 600)))
    st.stop()
points, invalid = [], []
for spec in grid:
    try:
        points.append(resolved_spec(spec, cores))
    except UserError as e:  # e.g. a block that does not divide this layer: skipped with a message
        invalid.append(f"{spec.label()} at {spec.sparsity:g}: {one_line(e, 600)}")


def _measured(point) -> bool:
    """Whether this point needs no measuring (stored already)."""
    return lookup(point, store(), backend) is not None


if go:  # the limits first: the sweep's size, then this session's rate (only points still to measure count)
    try:
        current_limits().check_sweep(len(grid))
        RATE_LIMITER.take(session_id(), sum(not _measured(point) for point in points))
    except UserError as e:
        st.error(escape(str(e)))
        go = False
if go and backend.kind == "rpc":  # fanned out over the key's servers; points arrive in any order
    bar = st.progress(0.0, text=f"starting on {backend.label()}")
    failures, finished = list(invalid), 0
    try:
        for event in sweep.stream(points, backend, store()):
            if event.kind == "retried":
                st.warning(escape(f"{event.spec.label()} at {event.spec.sparsity:g}: its server was lost "
                                  f"({one_line(event.message, 300)}); measuring it on another server"))
                continue
            finished += 1
            bar.progress(finished / len(points), text=f"{finished}/{len(points)}: {event.spec.label()} at "
                         f"{event.spec.sparsity:g}")
            if event.kind == "failed":
                failures.append(f"{event.spec.label()} at {event.spec.sparsity:g}: {event.message}")
    except UserError as e:  # e.g. the tracker cannot be reached
        failures.append(str(e))
    bar.progress(1.0, text=f"done on {backend.label()}: {finished - len(failures) + len(invalid)} of {len(grid)} points")
    for f in failures:
        st.error(escape(one_line(f, 600)))
elif go:
    bar = st.progress(0.0, text="starting")
    failures = list(invalid)
    for i, point in enumerate(points):
        spec = point.spec
        bar.progress(i / len(points), text=f"{i}/{len(points)}: {spec.label()} at {spec.sparsity:g}")
        try:
            run(point, store=store())
        except UserError as e:  # e.g. over a limit: skip it, keep the rest
            failures.append(f"{spec.label()} at {spec.sparsity:g}: {one_line(e, 600)}")
        except Exception as e:  # the engine failed on this point: say so, keep the points already stored
            failures.append(f"{spec.label()} at {spec.sparsity:g}: the engine failed: {type(e).__name__}: "
                            f"{one_line(e)}")
    bar.progress(1.0, text=f"done: {len(grid) - len(failures)} of {len(grid)} points")
    for f in failures:
        st.error(escape(f))

results = []
for point in points:
    try:
        if (hit := lookup(point, store(), backend)) is not None:  # this device, this code: one set of conditions
            results.append(hit)
    except UserError as e:  # an unreachable tracker: say it once
        st.error(escape(one_line(e, 600)))
        break
if not results:
    st.info("No point of this grid is measured yet: press **Run sweep**.")
    st.stop()

df = analysis.frame(results)
st.caption(f"{len(df)} of {len(grid)} points measured. " + conditions(results[0]))
speedup = st.radio("Speedup against", ["speedup_vs_best_dense", "speedup_vs_torch_dense", "speedup_vs_tvm_dense"],
                   horizontal=True, key="sweep_speedup", format_func=lambda s: s.removeprefix("speedup_vs_").replace("_", " "))
proxy = st.selectbox("Accuracy proxy", list(PROXIES), key="sweep_proxy",
                     format_func=lambda p: PROXIES[p].label)
c1, c2 = st.columns(2)
c1.altair_chart(charts.speedup_vs_sparsity(df, speedup), key="sweep_speedup_chart")
c2.altair_chart(charts.speedup_heatmap(df, speedup), key="sweep_heatmap")
c1, c2 = st.columns(2)
c1.altair_chart(charts.proxy_vs_sparsity(df, proxy), key="sweep_proxy_chart")
c2.altair_chart(charts.tradeoff(df, proxy, speedup), key="sweep_pareto")
st.markdown("**Break-even sparsity** (where the sparse kernel starts to beat dense; interpolated between the two "
            "measured points around 1x)")
st.dataframe(analysis.break_even(df, speedup), hide_index=True, key="sweep_breakeven")
st.dataframe(df, hide_index=True)
st.subheader("Compare devices")
by_device = analysis.device_frame(store().results(model=model_name, layer=layer),
                                  [point.spec for point in points])
if by_device.empty or by_device["device"].nunique() < 2:
    st.caption("Measure this grid on another device (sidebar: Measure on) to see the devices side by side.")
else:
    st.altair_chart(charts.devices(by_device), key="sweep_devices_chart")
    st.caption(f"{by_device['device'].nunique()} devices: " + "; ".join(
        f"{d} ({len(g)} points)" for d, g in by_device.groupby("device")) + ". Each speedup is against TVM dense "
               "timed on the same device in the same measurement.")
st.download_button("Download CSV", df.to_csv(index=False), file_name=f"sweep-{model_name}-{layer}.csv",
                   mime="text/csv", key="sweep_csv")
