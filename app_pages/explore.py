"""Explore a layer: configure one experiment, run it, see its cost and its place among the others."""
import streamlit as st

from app_pages.common import (METHOD_HELP, NM_METHODS, PRECISION_HELP, SEED_HELP, SEED_LABEL, backend_controls, cache_controls,
                              conditions, pick_conditions, query_spec, resolved_on, run_with_status, store)
from sparsity_app import Spec, UserError
from sparsity_app.accuracy.proxies import PROXIES
from sparsity_app.core.limits import current as current_limits
from sparsity_app.core.requests import (BLOCK_PRESETS, MAX_TOKENS, NM_PRESETS, NORMS, PRECISIONS, fmt_block, parse_block,
                                        parse_nm)
from sparsity_app.core.results import ALL_DENSE_PEERS, REMEASURE, SPARSE
from sparsity_app.model.catalog import MODEL_NAMES, get_model
from sparsity_app.model.pruned import mask_of
from sparsity_app.prune.methods import METHODS
from sparsity_app.runs.layer import lookup
from sparsity_app.serve import analysis, charts
from sparsity_app.serve.links import escape, spec_to_query

st.title("Explore a layer")
st.caption("Prune one layer of a real model, compile it to a sparse TVM kernel for this CPU (BSR, CSR or N:M), "
           "and see how much faster it runs than the best dense kernel and what it costs in accuracy.")
cache_controls()
backend = backend_controls()

start = query_spec()
model_name = st.selectbox("Model", MODEL_NAMES, index=MODEL_NAMES.index(start.model), key="model",
                          format_func=lambda n: f"{n}: {get_model(n).description}")
layers = {l.name: l.shape for l in get_model(model_name).layers()}
block_text = fmt_block(start.block)

with st.form("explore"):
    c1, c2, c3 = st.columns([3, 1, 1])
    layer = c1.selectbox("Layer", list(layers), index=list(layers).index(start.layer) if start.layer in layers else 0,
                         format_func=lambda n: f"{n}  ({layers[n][0]}x{layers[n][1]})", key="layer")
    precision = c3.selectbox("Precision", list(PRECISIONS), index=list(PRECISIONS).index(start.precision),
                             key="precision", help=PRECISION_HELP)
    max_tokens = min(current_limits().max_tokens or MAX_TOKENS, MAX_TOKENS)  # this server's limit
    tokens = c2.number_input("Tokens", 1, max_tokens, min(start.tokens, max_tokens), key="tokens",
                             help=f"rows of X that are timed; at most {max_tokens} on this server")
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Pruning method", list(METHODS), index=list(METHODS).index(start.method), key="method",
                          help=METHOD_HELP)
    preset = c2.selectbox("Block shape (bs_r x bs_c)", [*BLOCK_PRESETS, "custom"], key="block",
                          index=BLOCK_PRESETS.index(block_text) if block_text in BLOCK_PRESETS else len(BLOCK_PRESETS))
    custom = c3.text_input("Custom block", block_text, key="custom_block", help="e.g. 64x1; used when the preset is 'custom'")
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1])
    sparsity = c1.slider("Sparsity (fraction removed)", 0.0, 0.99, float(start.sparsity), 0.01, key="sparsity")
    nm_names = [*NM_PRESETS, "none"]
    nm_default = "none" if start.nm is None else f"{start.nm[0]}:{start.nm[1]}"
    nm = c2.selectbox(f"N:M ({NM_METHODS})", nm_names, key="nm",
                      index=nm_names.index(nm_default) if nm_default in nm_names else 0)
    norm = c3.radio("Block score", NORMS, index=NORMS.index(start.norm), horizontal=True, key="norm")
    seed = c4.number_input(SEED_LABEL, 0, 2**31 - 1, int(start.seed), key="seed", help=SEED_HELP)
    retune = st.checkbox("Measure again and re-tune the schedule (ignore what is stored)", key="retune")
    submitted = st.form_submit_button("Run", type="primary")

spec = None
try:
    spec = Spec(model=model_name, layer=layer, method=method, tokens=int(tokens), sparsity=float(sparsity), norm=norm,
                seed=int(seed), precision=precision,
                block=parse_block(custom if preset == "custom" else preset),
                nm=None if nm == "none" else parse_nm(nm))
except UserError as e:
    st.error(escape(str(e)))

result = None
if submitted and spec is not None:
    st.query_params.from_dict(spec_to_query(spec))
    result = run_with_status(spec, retune=retune, backend=backend)
elif spec is not None:
    try:
        result = lookup(resolved_on(spec, backend), store(), backend)  # a shared link's cached result shows at once
    except UserError as e:
        st.error(escape(str(e)))

if result is None:
    st.info("Choose a configuration and press **Run**. Nothing is compiled until you do.")
    st.stop()

r, d = result, result.to_dict()
t = r.times_ms
if not r.real_weights:
    st.warning(d["accuracy_note"])
st.subheader(f"{r.spec.label()} at sparsity {r.sparsity_achieved:.3f} on {r.spec.layer} ({r.shape[0]}x{r.shape[1]})")
if r.noisy:
    st.warning(f"**Not a figure: the machine was busy.** Measured {1 + REMEASURE} times and still {r.noisy}. The "
               "numbers below are shown as measured; Learn's verdicts and the Pareto front leave this result out. "
               "Run it again on a quiet machine (tick \"Measure again\" above).", icon=":material/warning:")
c = st.columns(4)
c[0].metric("Speedup vs best dense", f"{r.speedup_vs_best_dense:.2f}x", f"ideal {r.ideal_speedup:.2f}x",
            delta_color="off", help="Best dense = the fastest dense peer of the same measurement: "
            + "; ".join(v for k, v in ALL_DENSE_PEERS.items() if k in t))
c[1].metric("Achieved sparsity", f"{r.sparsity_achieved:.3f}", f"target {r.spec.sparsity:g}", delta_color="off")
c[2].metric(f"{analysis.kernel_title(r)[4:]} bytes vs dense", f"{r.sparse_bytes / 1024:.0f} KiB",
            f"dense {r.dense_bytes / 1024:.0f} KiB", delta_color="off")
c[3].metric("Tuning / compile time", f"{r.tune_s:.2f} s / {r.compile_s:.2f} s",
            "schedule reused: no tuning" if not r.tune_s else "tuned in this run", delta_color="off")
titles = {SPARSE: analysis.kernel_title(r), **{k: v.split(" (")[0] for k, v in ALL_DENSE_PEERS.items()}}
c = st.columns(len([k for k in titles if k in t]))
for col, name in zip(c, [k for k in titles if k in t]):
    best = " (best dense)" if name == r.best_dense else ""
    col.metric(f"{titles[name]}{best}", f"{t[name].median * 1000:.1f} us",
               f"spread {t[name].spread * 1000:.1f} us" + ("" if name == SPARSE else f"; {r.speedup_vs(name):.2f}x"),
               delta_color="off")
c = st.columns(len(PROXIES))
for col, (name, proxy) in zip(c, PROXIES.items()):
    value = r.proxies.get(name)
    col.metric(proxy.label, "n/a" if value is None else f"{value:.3f}")
if r.same_pattern:
    st.markdown(f"**What the reconstruction buys**: {r.spec.method} moves the weights it keeps to make up for those it "
                "drops. The same pattern at the same density, scored on the same calibration tokens:")
    st.dataframe(analysis.same_pattern_frame(r), hide_index=True,
                 column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                for c in ("layer output cosine", "layer output relative error")})
st.caption(conditions(r) + f" Layer proxies scored on {r.scored_tokens or '?'} calibration tokens (all of them), "
           f"independent of the {r.spec.tokens} timed. {r.stored_blocks} blocks stored."
           + (" Loaded from the cache." if r.cached else ""))
if r.step_s:
    st.caption("This run's steps, wall seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in r.step_s.items()))

tuning = r.kernel.get("tuning")
if tuning:
    with st.expander(f"Schedule: {tuning['label']}, {tuning['gain']:.2f}x faster than the untuned default"
                     + (" (tuned earlier, reused)" if tuning.get("cached") else "")):
        st.caption("The tuner compiled these schedules for this block shape and sparsity, checked each against "
                   "NumPy and timed them; the winner is kept, so this case is never tuned again on this machine.")
        st.dataframe(analysis.tuning_frame(r), hide_index=True,
                     column_config={"median_us": st.column_config.NumberColumn("median (us)", format="%.1f"),
                                    "vs_winner": st.column_config.NumberColumn("x winner's time", format="%.2f")})

left, right = st.columns([1, 2])
with left:
    chart, factor = charts.mask_heatmap(mask_of(r.spec))
    st.altair_chart(chart, key="mask")
    st.caption(f"Kept weights of the real {r.shape[0]}x{r.shape[1]} weight (white = pruned). "
               + (f"Downsampled: each cell is the kept fraction of {factor}x{factor} weights." if factor > 1
                  else "One cell per weight."))
with right:
    proxy = st.selectbox("Accuracy proxy", list(PROXIES), key="proxy",
                         format_func=lambda p: PROXIES[p].label)
    groups = analysis.by_conditions(store().results(model=r.spec.model, layer=r.spec.layer), prefer=r)
    chosen = pick_conditions(groups, key="tradeoff_conditions")
    df = analysis.frame(groups.get(chosen, []))
    mine = bool(len(df)) and chosen == analysis.conditions_label(r.conditions())
    st.altair_chart(charts.tradeoff(df, proxy, current=r.row() if mine else None), key="tradeoff")
    st.caption(f"Every cached result of this layer measured under one set of conditions ({len(df)} points): {chosen}.")
