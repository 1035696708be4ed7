"""Whole model: prune every encoder linear, run the sparse model end to end in TVM, see speed and real accuracy."""
import dataclasses

import pandas as pd
import streamlit as st

from app_pages import job_panel
from app_pages.common import (METHOD_HELP, NM_METHODS, PRECISION_HELP, SEED_HELP, SEED_LABEL, cache_controls, pick_conditions,
                              resolved_plan, store)
from sparsity_app import UserError
from sparsity_app.accuracy.metrics import METRICS
from sparsity_app.core.requests import (BLOCK_PRESETS, MAX_BATCH, NM_PRESETS, PRECISIONS, ROLES, ModelPlan, parse_block,
                                        parse_nm)
from sparsity_app.core.results import MODEL_DENSE_PEERS, MODEL_OTHER_PEERS, REMEASURE
from sparsity_app.model.catalog import MODEL_NAMES, get_model
from sparsity_app.prune.methods import METHODS
from sparsity_app.runs.model import lookup
from sparsity_app.serve import analysis, charts, jobs
from sparsity_app.serve.links import plan_from_query, plan_to_query

st.title("Whole model")
st.caption("Prune every encoder linear of a model with one pattern (and per-layer overrides), run the pruned model "
           "end to end as one TVM executable of our kernels, and compare it with dense TVM, PyTorch and ONNX Runtime, "
           "and with the dense model on real labels.")
cache_controls()

start, notes = plan_from_query(dict(st.query_params), resolver=resolved_plan)
for note in notes:
    st.warning(note, icon=":material/link_off:")
block_text = f"{start.block[0]}x{start.block[1]}"
nm_text = "none" if start.nm is None else f"{start.nm[0]}:{start.nm[1]}"
with st.form("model"):
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1])
    model_name = c1.selectbox("Model", MODEL_NAMES, index=MODEL_NAMES.index(start.model), key="m_model",
                              format_func=lambda n: f"{n}: {get_model(n).description}")
    method = c2.selectbox("Pruning method", list(METHODS), index=list(METHODS).index(start.method), key="m_method",
                          help=METHOD_HELP)
    block = c3.selectbox("Block shape", BLOCK_PRESETS, key="m_block",
                         index=BLOCK_PRESETS.index(block_text) if block_text in BLOCK_PRESETS else 0)
    nm_names = [*NM_PRESETS, "none"]
    nm = c4.selectbox(f"N:M ({NM_METHODS})", nm_names, index=nm_names.index(nm_text) if nm_text in nm_names else 0,
                      key="m_nm")
    c1, c2, c3, c4, c5 = st.columns([2, 1, 1, 1, 1])
    sparsity = c1.slider("Sparsity of every layer", 0.0, 0.99, float(start.sparsity), 0.01, key="m_sparsity")
    tokens = c2.number_input("Tokens per sequence", 2, 512, start.tokens, key="m_tokens")
    batch = c3.number_input("Batch", 1, MAX_BATCH, start.batch, key="m_batch")
    seed = c4.number_input(SEED_LABEL, 0, 2**31 - 1, int(start.seed), key="m_seed", help=SEED_HELP)
    precision = c5.selectbox("Precision", list(PRECISIONS), index=list(PRECISIONS).index(start.precision),
                             key="m_precision", help=PRECISION_HELP + " Every linear (a layer left dense runs dense "
                             "INT8); attention, softmax, layer norm and GELU stay float32.")
    overrides = st.text_area("Per-layer overrides, one per line: TARGET=VALUE", "\n".join(start.overrides),
                             key="m_overrides",
                             placeholder="attention.self.*=0.7\nffn-out=dense\nencoder.layer.0.*=16x1@0.5\nq=2:4",
                             help=f"TARGET: a role ({', '.join(ROLES)}) or a layer-name glob. VALUE: a sparsity, "
                                  "'dense', a block at a sparsity (16x1@0.8) or an N:M pattern (2:4). The last "
                                  "override that matches a layer wins.")
    go = st.form_submit_button("Run the whole model", type="primary")

plan = resolved = None
try:
    plan = ModelPlan(model=model_name, method=method, block=parse_block(block), sparsity=float(sparsity),
                     nm=None if nm == "none" else parse_nm(nm), tokens=int(tokens), batch=int(batch), seed=int(seed),
                     overrides=tuple(line.strip() for line in overrides.splitlines() if line.strip()),
                     threads=start.threads, repeat=start.repeat, precision=precision)  # from the link (the CLI sets them; the form does not)
    resolved = resolved_plan(plan)  # the page's one check of the plan: the job and the lookup take it as it is
except UserError as e:
    st.error(str(e))

result, job, job_id = None, None, job_panel.job_in_link()
if resolved is not None:
    try:
        if go:  # the run is a job of the machine's worker: it outlives this tab, and the link shows it
            submitted = job_panel.submit("model", resolved.to_dict(), plan_to_query(plan))
            if submitted.result_key is not None:
                result = store().get_model_result(submitted.result_key)
            else:
                job_id = submitted.job.id
        if result is None and job_id is not None:
            job = job_panel.show(job_id)
            if job is not None and job.state == "done":
                result = store().get_model_result(job.result_key)
                if result is None:
                    st.warning("The job finished, but its result is no longer in the cache. Press Run to measure "
                               "the plan again.")
                else:
                    result = dataclasses.replace(result, cached=False)  # measured by this link's job
        elif result is None:
            result = lookup(resolved, store())  # a plan already measured shows at once
    except UserError as e:
        st.error(str(e))
    except Exception as e:  # the engine failed: say so, keep the page alive
        st.error(f"The engine failed: {type(e).__name__}: {e}")

if result is None and job is not None and job.state not in jobs.FINISHED:
    st.stop()  # the job's panel is the screen until it finishes
if result is None:
    st.info("Choose a plan and press **Run the whole model**. A cold run tunes, compiles and evaluates for a minute "
            "or more; a measured plan shows at once.")
    st.stop()

d = result.to_dict()
if not result.real_weights:
    st.warning(d["accuracy_note"])
st.subheader(f"{result.plan.label()} on {result.plan.model}: achieved sparsity {result.sparsity_achieved:.3f}")
if result.noisy:
    st.warning(f"**Not a figure: the machine was busy.** Measured {1 + REMEASURE} times and still {result.noisy}. "
               "The numbers below are shown as measured, not as evidence; run the plan again on a quiet machine.",
               icon=":material/warning:")
c = st.columns(4)
c[0].metric("Speedup vs best dense", f"{d['speedup_vs_best_dense']:.2f}x", f"best: {d['best_dense']}", delta_color="off")
c[1].metric("vs PyTorch eager", f"{d['speedup_vs_torch_eager']:.2f}x", "paper: 4x on BERT-base", delta_color="off")
c[2].metric("vs TVM dense", f"{d['speedup_vs_tvm_dense']:.2f}x", "paper: 2.2x on BERT-base", delta_color="off")
c[3].metric("Amdahl bound", f"{result.amdahl_bound:.2f}x", "over TVM dense if the linears were free", delta_color="off")
peers = {**MODEL_DENSE_PEERS, **MODEL_OTHER_PEERS, "tvm_sparse": "TVM sparse: the same graph, each linear our sparse kernel"}
st.dataframe(pd.DataFrame([{"implementation": peers[k], "median_ms": t.median, "spread_ms": t.spread,
                            "sparse is x faster": result.speedup_vs(k)} for k, t in result.times_ms.items()]),
             hide_index=True, key="m_times")
if result.real_weights:
    st.dataframe(pd.DataFrame([{"metric": METRICS[k].label, "pruned": v, "dense": result.dense_metrics.get(k)}
                               for k, v in result.metrics.items()]), hide_index=True, key="m_metrics")
st.caption(f"Measured {analysis.model_conditions(result)}; every implementation in one measurement, median and "
           f"interquartile spread. The sparse executable matches the masked PyTorch model to a relative error of "
           f"{result.max_abs_error:.1e}. Tuning {result.tune_s:.1f} s, compiling {result.compile_s:.1f} s."
           + (" Loaded from the cache." if result.cached else ""))

st.altair_chart(charts.breakdown_bars(result.breakdown), key="m_breakdown")
with st.expander("Per-layer table: pattern, achieved sparsity, kernel, schedule"):
    st.dataframe(analysis.layer_frame(result), hide_index=True, key="m_layers")

lengths = analysis.length_frame(store().model_results(model=result.plan.model), result)
if lengths["tokens"].nunique() >= 2:
    st.altair_chart(charts.time_per_length(lengths), key="m_lengths")
else:
    st.caption("Run this plan at other token counts (the Tokens field) to chart its time per length here; "
               "`python -m sparsity_app bench-model --lengths 8..128` measures every length in one run.")

st.subheader("Accuracy vs end-to-end speedup, every measured plan")
groups = {}
for r in store().model_results(model=result.plan.model):
    groups.setdefault(analysis.model_conditions(r), []).append(r)
mine = analysis.model_conditions(result)
groups = {mine: groups.pop(mine, [result]), **groups}
chosen = pick_conditions(groups, key="m_conditions")
c1, c2 = st.columns(2)
metric = c1.selectbox("Metric", list(METRICS), key="m_metric",
                      format_func=lambda k: METRICS[k].label)
speedup = c2.radio("Speedup against", ["speedup_vs_best_dense", "speedup_vs_torch_eager", "speedup_vs_tvm_dense",
                                       "speedup_vs_onnxruntime"], horizontal=True, key="m_speedup",
                   format_func=lambda s: s.removeprefix("speedup_vs_").replace("_", " "))
df = analysis.model_frame(groups[chosen])
noisy = int(df["noisy"].sum())
df = df[~df["noisy"]]  # noise is never a point of the trade-off
if noisy:
    st.caption(f"{noisy} plan{'s' if noisy > 1 else ''} measured on a busy machine left out of the chart.")
if result.real_weights:
    df = pd.concat([df, pd.DataFrame([analysis.dense_point(groups[chosen][0])])], ignore_index=True)
    st.altair_chart(charts.model_tradeoff(df, metric, speedup), key="m_tradeoff")
    st.caption(f"{len(df) - 1} measured plans under one set of conditions: {chosen}. Dashed red: the paper's headline "
               "speedup where the axis matches it (it measured BERT-base; this is the chosen model).")
else:
    st.info("Synthetic weights: no accuracy to chart.")

# ---- Download (export.zip_bytes): the pruned model, the compiled library and its loader, the results ----
with st.expander("Download this model: Hugging Face folder, compiled sparse library + loader, results"):
    st.caption("A zip of `hf/` (loads with `transformers.AutoModel.from_pretrained`), `sparse_model.so` with "
               "`run_sparse_model.py` (runs with only TVM and NumPy; the weights are baked into the library), "
               "`result.json` and `layers.csv`. Building it compiles the sparse encoder again (a minute or so).")
    if st.button("Build the download", key="m_export_build"):
        from sparsity_app.serve.export import zip_bytes

        try:
            with st.spinner("Exporting..."):
                st.session_state["m_export_zip"] = (result.plan, zip_bytes(resolved_plan(result.plan), store=store(), result=result))
        except UserError as e:
            st.error(str(e))
        except Exception as e:  # the engine failed: say so, keep the page alive
            st.error(f"The export failed: {type(e).__name__}: {e}")
    built = st.session_state.get("m_export_zip")
    if built is not None and built[0] == result.plan:
        st.download_button(f"Download ({len(built[1]) / 2**20:.0f} MiB zip)", built[1], file_name="sparse_model.zip",
                           mime="application/zip", key="m_export_download")
