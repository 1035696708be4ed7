"""Sensitivity: prune one layer at a time, see which layers the accuracy depends on, and allocate sparsity."""
import pandas as pd
import streamlit as st

from app_pages.common import cache_controls, store
from sparsity_app import UserError
from sparsity_app.accuracy.metrics import METRICS
from sparsity_app.core.requests import BLOCK_PRESETS, MAX_BATCH, NM_PRESETS, parse_block, parse_nm, plan_to_command
from sparsity_app.model.catalog import MODEL_NAMES, get_model
from sparsity_app.prune.methods import METHODS
from sparsity_app.runs.sensitivity import (SensitivityRequest, allocate, lookup, loss_metrics, ranking,
                                           remainder_from_store, run_sensitivity)
from sparsity_app.serve import analysis, charts
from sparsity_app.serve.links import plan_to_query

st.title("Layer sensitivity")
st.caption("Prune one layer at a time (every other layer dense) at a few sparsities, score the model on real labels, "
           "time the layer's sparse kernel, and spend a sparsity or latency budget where it costs the least accuracy.")
cache_controls()

with st.form("sensitivity"):
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1])
    model_name = c1.selectbox("Model", MODEL_NAMES, key="s_model", format_func=lambda n: f"{n}: {get_model(n).description}")
    method = c2.selectbox("Pruning method", list(METHODS), index=list(METHODS).index("block"), key="s_method")
    block = c3.selectbox("Block shape", BLOCK_PRESETS, key="s_block")
    nm = c4.selectbox("N:M (method nm)", [*NM_PRESETS, "none"], index=len(NM_PRESETS), key="s_nm")
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1])
    sparsities = c1.multiselect("Sparsities", [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], default=[0.5, 0.7, 0.9],
                                key="s_sparsities")
    tokens = c2.number_input("Tokens per sequence", 2, 512, 128, key="s_tokens")
    batch = c3.number_input("Batch", 1, MAX_BATCH, 1, key="s_batch")
    timed = c4.checkbox("Time each layer's kernel", True, key="s_timed")
    layers = st.multiselect("Layers (none = every prunable linear)", [i.name for i in get_model(model_name).layers()],
                            key="s_layers")
    go = st.form_submit_button("Measure the sensitivity", type="primary")

request = None
try:
    request = SensitivityRequest(model=model_name, method=method, block=parse_block(block),
                                 nm=None if nm == "none" else parse_nm(nm), sparsities=tuple(sorted(sparsities)),
                                 layers=tuple(layers), tokens=int(tokens), batch=int(batch), time_kernels=timed).resolve()
except UserError as e:
    st.error(str(e))

result = None
if request is not None:
    try:
        if go:
            n = len(request.points())
            bar = st.progress(0.0, text=f"{n} points (stored ones are read back)")

            def show(step: str, detail: str) -> None:
                done, total = (int(v) for v in step.split("/"))
                bar.progress((done - 1) / total, text=f"[{step}] {detail}")

            result = run_sensitivity(request, store=store(), progress=show)
            bar.progress(1.0, text="Loaded from the cache" if result.cached else f"Measured {n} points")
        else:
            result = lookup(request, store())
    except UserError as e:
        st.error(str(e))
    except Exception as e:  # the engine failed: say so, keep the page alive (measured points stay stored)
        st.error(f"The engine failed: {type(e).__name__}: {e}")

if result is None:
    st.info("Choose a grid and press **Measure the sensitivity**. Each point evaluates the model (a few seconds) and "
            "times one kernel; 36 layers x 3 sparsities takes minutes the first time. Every point is stored as it "
            "finishes, so an interrupted run resumes.")
    st.stop()
if not result.real_weights:
    st.warning("Synthetic weights: no accuracy to rank or allocate by (kernel times only).")
    st.dataframe(analysis.sensitivity_frame(result), hide_index=True, key="s_points")
    st.stop()

metric = st.selectbox("Metric", loss_metrics(), key="s_metric", format_func=lambda k: METRICS[k].label)
df = analysis.sensitivity_frame(result, metric)
st.altair_chart(charts.sensitivity_heatmap(df, metric), key="s_heatmap")
st.caption(f"Loss = dense {metric} ({result.dense_metrics[metric]:.3f}) minus the metric with only that layer pruned; "
           "a negative loss means pruning that layer alone did not hurt on this metric (within its noise).")
with st.expander("Layer ranking, most sensitive first"):
    st.dataframe(pd.DataFrame(ranking(result, metric)), hide_index=True, key="s_ranking")

st.subheader("Allocate")
c1, c2 = st.columns(2)
kind = c1.radio("Target", ["overall sparsity", "latency (ms per pass)"], horizontal=True, key="s_kind",
                disabled=not request.time_kernels)
remainder = remainder_from_store(request, store()) if kind.startswith("latency") else None
if kind == "overall sparsity":
    top = float(max(request.sparsities))
    value = c2.slider("Overall sparsity (by weight count)", 0.05, top, min(0.7, top), 0.01, key="s_target")
else:
    value = c2.number_input("Latency target, ms per pass", 0.01, 10_000.0, 10.0, key="s_latency")
try:
    a = allocate(result, target_sparsity=value if kind == "overall sparsity" else None,
                 target_latency_ms=value if kind != "overall sparsity" else None, metric=metric, remainder_ms=remainder)
except UserError as e:
    st.error(str(e))
    st.stop()
c = st.columns(3)
c[0].metric("Achieved sparsity", f"{a.sparsity:.3f}")
c[1].metric(f"Predicted {metric} loss", f"{a.predicted_loss:.4f}", "sum of single-layer losses", delta_color="off")
c[2].metric("Predicted ms", "-" if a.predicted_ms is None else f"{a.predicted_ms:.3f}",
            "kernels" + (" + rest of the pass" if a.remainder_ms is not None else " only"), delta_color="off")
st.dataframe(analysis.allocation_frame(a, result), hide_index=True, key="s_allocation")
st.caption(a.note)
st.page_link("app_pages/model.py", label="Open this plan on the Whole model page", query_params=plan_to_query(a.plan),
             icon=":material/account_tree:")
st.code(plan_to_command(a.plan), language="bash")
