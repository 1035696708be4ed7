"""Recover accuracy: fine-tune a pruned model toward the dense one, then see what it won back and at what speed."""
import pandas as pd
import streamlit as st

from app_pages import job_panel
from app_pages.common import cache_controls, pick_conditions, resolved_plan, resolved_recovery, store
from sparsity_app import UserError
from sparsity_app.accuracy.metrics import METRICS
from sparsity_app.accuracy.recipes import LENGTHS, RECIPES
from sparsity_app.core.errors import one_line
from sparsity_app.core.requests import BLOCK_PRESETS, NM_PRESETS, ModelPlan, RecoveryRequest, parse_block, parse_nm
from sparsity_app.prune.methods import METHODS
from sparsity_app.runs.model import lookup as lookup_model
from sparsity_app.runs.recover import lookup, recovery_code
from sparsity_app.serve import analysis, charts, jobs
from sparsity_app.serve.links import (RECOVERY_PARAMETERS, escape, plan_from_query, recovery_from_query,
                                      recovery_to_query)

st.title("Recover accuracy")
st.caption("Pruning every linear one-shot costs accuracy. A short fine-tune on unlabelled text (gensim's "
           "lee_background and head500 corpora, never the evaluation texts), masks enforced, distilling the dense "
           "model's hidden states, wins part of it back. Pick a plan and a recipe; the recovered weights are then "
           "compiled, verified, timed and scored like any other model.")
cache_controls()

query = dict(st.query_params)
start, notes = plan_from_query(query, also=("job", *RECOVERY_PARAMETERS), resolver=resolved_plan)
start_request, more = recovery_from_query(query, start, resolver=resolved_recovery)
for note in notes + more:
    st.warning(note, icon=":material/link_off:")
block_text = f"{start.block[0]}x{start.block[1]}"
nm_text = "none" if start.nm is None else f"{start.nm[0]}:{start.nm[1]}"
with st.form("recover"):
    c1, c2, c3, c4 = st.columns(4)
    method = c1.selectbox("Pruning method", list(METHODS), index=list(METHODS).index(start.method), key="r_method")
    block = c2.selectbox("Block shape", BLOCK_PRESETS, key="r_block",
                         index=BLOCK_PRESETS.index(block_text) if block_text in BLOCK_PRESETS else 0)
    nm_names = [*NM_PRESETS, "none"]
    nm = c3.selectbox("N:M (method nm)", nm_names, index=nm_names.index(nm_text) if nm_text in nm_names else 0,
                      key="r_nm")
    sparsity = c4.slider("Sparsity of every layer", 0.0, 0.99, float(start.sparsity), 0.01, key="r_sparsity")
    c1, c2, c3 = st.columns([2, 1, 1])
    recipe = c1.selectbox("Recipe", list(RECIPES), index=list(RECIPES).index(start_request.recipe), key="r_recipe",
                          help="fixed: one-shot masks kept (the baseline). gradual: sparsity rises on a cubic schedule. "
                               "sr-ste: masks recomputed every step, straight-through gradient (N:M). mask-decay: "
                               "pruned weights fade out (beta 1 -> 0). structure-decay: N:M stepped from dense to the "
                               "target. group-lasso: block norms penalised, then the smallest blocks pruned.")
    steps = c2.number_input(f"Steps ({start_request.batch} x {start_request.seq_len} tokens each)", 1, 5000,
                            int(start_request.steps), key="r_steps")
    tokens = c3.number_input("Tokens timed per sequence", 2, 512, start.tokens, key="r_tokens")
    go = st.form_submit_button("Recover, then measure the whole model", type="primary")

request = None
try:
    plan = ModelPlan(method=method, block=parse_block(block), sparsity=float(sparsity),
                     nm=None if nm == "none" else parse_nm(nm), tokens=int(tokens), overrides=start.overrides,
                     threads=start.threads, repeat=start.repeat)
    plan_checked = resolved_plan(plan)  # the page's one check of each request: the job and lookups take them
    resolved = resolved_recovery(RecoveryRequest(plan=plan, recipe=recipe, steps=int(steps), batch=start_request.batch,
                                                 seq_len=start_request.seq_len, lengths=start_request.lengths),
                                 plan_checked)  # the link's training shape (the CLI's flags)
    request = resolved.request
except UserError as e:
    st.error(escape(one_line(e, 600)))

recovered = measured = job = None
job_id = job_panel.job_in_link()
if request is not None:
    try:
        if go:  # a job of the machine's worker: it outlives this tab, and the link shows it
            submitted = job_panel.submit("recover", jobs.recovery_request(resolved, plan_checked),
                                         recovery_to_query(request) | {"tokens": str(plan.tokens)})
            job_id = None if submitted.job is None else submitted.job.id
        if job_id is not None:
            job = job_panel.show(job_id)
        if job is None or job.state == "done":
            recovered = lookup(resolved, store())  # a recovered plan shows at once
            if recovered is not None:
                measured = lookup_model(plan_checked, store(), recovered)
    except UserError as e:
        st.error(escape(one_line(e, 600)))
    except Exception as e:  # the engine failed: say so, keep the page alive
        st.error(escape(f"The engine failed: {type(e).__name__}: {one_line(e)}"))

if recovered is None and job is not None and job.state not in jobs.FINISHED:
    st.stop()  # the job's panel is the screen until it finishes
if recovered is None:
    st.info("Choose a plan and a recipe, then press the button. 300 steps take several minutes on 2 cores (the "
            "job goes on if you close the tab; the link shows it); a recovered plan shows at once.")
    st.stop()

d = recovered.to_dict()
st.subheader(f"{request.label()} of {request.batch} x {request.seq_len} tokens: {d['wall_s']:.0f} s of training")
c = st.columns(4)
for col, k in zip(c, ("lee_pearson", "polarity_probe_acc", "wordsim_spearman", "simlex_spearman")):
    col.metric(METRICS[k].label, f"{d['metrics_after'][k]:.3f}",
               f"{d['metrics_after'][k] - d['metrics_before'][k]:+.3f} vs one-shot; dense {d['dense_metrics'][k]:.3f}")
if measured is not None:
    md = measured.to_dict()
    st.caption(f"The recovered model runs {md['speedup_vs_best_dense']:.2f}x faster than the best dense peer "
               f"({md['best_dense']}) end to end, {md['speedup_vs_torch_eager']:.2f}x PyTorch eager; it matches "
               f"PyTorch with the recovered weights to {md['max_abs_error']:.1e}. Measured "
               f"{analysis.model_conditions(measured)}.")
if recovered.loss:
    st.line_chart(pd.DataFrame(recovered.loss, columns=["step", "distillation loss"]).set_index("step"),
                  height=200)

st.subheader("Recipes side by side")
frame = analysis.recovery_frame(store().recoveries(model=request.plan.model))
st.dataframe(analysis.recipes_side_by_side(frame, request, recovery_code()), hide_index=True,
             key="r_recipes")
st.caption(f"Every recipe run on {request.plan.label()} for {request.steps} steps of {request.batch} x {request.seq_len} "
           f"tokens (as sequences of {'/'.join(map(str, LENGTHS[request.lengths](request.seq_len)))} tokens), "
           f"loss {request.loss}, learning rate {request.lr:g}, seed {request.seed}, by this code; gain = after minus "
           "one-shot.")

st.subheader("What recovery buys, at what speed")
groups = {}
for r in store().model_results(model=request.plan.model):
    groups.setdefault(analysis.model_conditions(r), []).append(r)
mine = analysis.model_conditions(measured) if measured is not None else None
if mine in groups:
    groups = {mine: groups.pop(mine), **groups}
chosen = pick_conditions(groups, key="r_conditions")
arrows = analysis.recovery_arrows(groups.get(chosen, []))
if arrows.empty:
    st.info("No plan under these conditions has both its one-shot and its recovered model measured yet.")
else:
    metric = st.selectbox("Metric", list(METRICS), key="r_metric",
                          format_func=lambda k: METRICS[k].label)
    st.altair_chart(charts.recovery_arrows(arrows, metric), key="r_arrows")
    st.caption(f"Measured {chosen}.")
