"""Sweep: a grid of block shapes x sparsities on one layer; every point is stored as it finishes."""
import streamlit as st

from app_pages.common import conditions, query_spec, store
from sparsity_app import Spec, UserError, analysis, charts
from sparsity_app.experiment import run, validate
from sparsity_app.models import MODEL_NAMES, get_model
from sparsity_app.spec import BLOCK_PRESETS, fmt_block, parse_block

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)

st.title("Sweep")
st.caption("Measure block shapes x sparsities on one layer. Each point is stored the moment it is measured: "
           "leaving the page or an error loses nothing, and points already measured come from the cache.")

start = query_spec()
model_name = st.selectbox("Model", MODEL_NAMES, index=MODEL_NAMES.index(start.model), key="sweep_model")
layers = {l.name: l.shape for l in get_model(model_name).layers()}
with st.form("sweep"):
    c1, c2, c3 = st.columns([3, 1, 1])
    layer = c1.selectbox("Layer", list(layers), index=list(layers).index(start.layer) if start.layer in layers else 0,
                         format_func=lambda n: f"{n}  ({layers[n][0]}x{layers[n][1]})", key="sweep_layer")
    tokens = c2.number_input("Tokens", 1, 4096, start.tokens, key="sweep_tokens")
    method = c3.selectbox("Method", ["block", "random"], key="sweep_method")
    blocks = st.multiselect("Block shapes", BLOCK_PRESETS, default=["32x1", "16x1", "1x32", "4x4"], key="sweep_blocks")
    sparsities = st.multiselect("Sparsities", SPARSITIES, default=[0.5, 0.7, 0.8, 0.9, 0.95], key="sweep_sparsities")
    go = st.form_submit_button("Run sweep", type="primary")

grid = [Spec(model=model_name, layer=layer, method=method, block=parse_block(b), sparsity=s, tokens=int(tokens))
        for b in blocks for s in sorted(sparsities)]
if go:
    bar = st.progress(0.0, text="starting")
    failures = []
    for i, spec in enumerate(grid):
        bar.progress(i / len(grid), text=f"{i}/{len(grid)}: {spec.label()} at {spec.sparsity:g}")
        try:
            run(spec, store=store())
        except UserError as e:  # e.g. a block that does not divide this layer: skip it, keep the rest
            failures.append(f"{spec.label()} at {spec.sparsity:g}: {e}")
    bar.progress(1.0, text=f"done: {len(grid) - len(failures)} of {len(grid)} points")
    for f in failures:
        st.error(f)

wanted = set()
for spec in grid:
    try:
        wanted.add(validate(spec)[0])
    except UserError:
        pass
results = [r for r in store().results(model=model_name, layer=layer) if r.spec in wanted]
if not results:
    st.info("No point of this grid is measured yet: press **Run sweep**.")
    st.stop()

df = analysis.frame(results)
st.caption(f"{len(df)} of {len(grid)} points measured. " + conditions(results[0]))
speedup = st.radio("Speedup against", ["speedup_vs_best_dense", "speedup_vs_torch_dense", "speedup_vs_tvm_dense"],
                   horizontal=True, key="sweep_speedup", format_func=lambda s: s.removeprefix("speedup_vs_").replace("_", " "))
proxy = st.selectbox("Accuracy proxy", list(analysis.PROXIES), key="sweep_proxy",
                     format_func=lambda p: analysis.PROXIES[p][0])
c1, c2 = st.columns(2)
c1.altair_chart(charts.speedup_vs_sparsity(df, speedup), key="sweep_speedup_chart")
c2.altair_chart(charts.speedup_heatmap(df, speedup), key="sweep_heatmap")
c1, c2 = st.columns(2)
c1.altair_chart(charts.proxy_vs_sparsity(df, proxy), key="sweep_proxy_chart")
c2.altair_chart(charts.tradeoff(df, proxy, speedup), key="sweep_pareto")
st.dataframe(analysis.break_even(df, speedup), hide_index=True)
st.dataframe(df, hide_index=True)
st.download_button("Download CSV", df.to_csv(index=False), file_name=f"sweep-{model_name}-{layer}.csv",
                   mime="text/csv", key="sweep_csv")
