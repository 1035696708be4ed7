"""Learn: what BSR stores, why block shape decides whether sparsity pays on a CPU, and the paper's claims."""
import pandas as pd
import streamlit as st

from app_pages.common import cache_controls, pick_conditions, store
from sparsity_app.core.requests import ModelPlan, fmt_block
from sparsity_app.model.catalog import MODEL_NAMES, get_model
from sparsity_app.runs.claims import DENSE_TITLES, layer_claims, model_claims
from sparsity_app.serve import analysis
from sparsity_app.serve.links import unknown_notes
from sparsity_app.serve.teach import bsr_example, rounded, weight_table

st.title("Learn: why block shape decides whether sparsity pays off")
cache_controls()
for note in unknown_notes(dict(st.query_params), known=()):  # this page reads no link parameter
    st.warning(note, icon=":material/link_off:")

st.header("1. What BSR stores")
st.markdown("Block compressed sparse row (BSR) cuts the weight into **bs_r x bs_c** blocks and stores only the "
            "blocks that hold a kept weight: `data` holds the blocks, `indices` the block-column of each, and "
            "`indptr[i]:indptr[i+1]` the range of `data` that belongs to block row *i*. "
            "Change the block shape and watch the three arrays change.")
block = st.radio("Block shape", [(1, 1), (4, 1), (8, 1), (1, 4), (2, 2), (4, 4)], format_func=fmt_block,
                 horizontal=True, key="learn_block", index=2)
w, mask, bsr = bsr_example(block)
c1, c2 = st.columns([3, 2])
c1.markdown(f"**An 8x16 weight pruned to 75% with {fmt_block(block)} blocks** (pruned weights blank)")
c1.dataframe(pd.DataFrame(weight_table(w, mask)), key="learn_weight")
c2.markdown(f"**indptr** ({bsr.indptr.size} entries, one per block row + 1)")
c2.code(str(bsr.indptr.tolist()))
c2.markdown(f"**indices** ({bsr.indices.size} stored blocks)")
c2.code(str(bsr.indices.tolist()))
c2.markdown(f"**data** shape {list(bsr.data.shape)}: {bsr.data.size} values for {int(mask.sum())} kept weights; "
            f"{bsr.nbytes} bytes vs {w.nbytes} dense")
c2.code(str(rounded(bsr.data[:2], 1)) + (" ..." if bsr.nnz_blocks > 2 else ""))

st.header("2. Why linear blocks suit CPU vector units")
st.markdown("A CPU multiplies 8 (AVX2) or 16 (AVX-512) floats in one instruction. With a **32x1** block, one "
            "input value is broadcast and multiplied against 32 contiguous weights that feed 32 *different* "
            "outputs: two full vector FMAs per block and per token, with the outputs held in registers across "
            "the whole block row. The index is read once per 32 weights. With a **1x32** block the 32 weights "
            "all feed the *same* output, so the work becomes a horizontal reduction; a **16x16** block moves "
            "256 weights per index but the block is so coarse that pruning whole blocks hurts accuracy more for "
            "the same sparsity. 1x1 (unstructured) blocks pay an index and a scattered load per weight.\n\n"
            "The best **schedule** depends on the block shape too (the paper's third finding): tall blocks "
            "vectorise over their rows; flat and small blocks (1x32, 4x4, 8x1) are faster vectorised over "
            "tokens, but then every stored weight needs its own load of a row of X. On **Explore**, open "
            "*Schedule* under a result to see which schedule the tuner picked and by how much it beat the untuned "
            "default.")

results = list(store().results())
groups = analysis.by_conditions(results)
st.markdown("**How close each pattern gets to the ideal speedup 1/(1-s) on this machine**, from your own cached "
            "measurements at sparsity >= 0.8 (median fraction of ideal against the best dense):")
chosen = pick_conditions(groups, key="learn_conditions")
df = analysis.frame(groups.get(chosen, []))
if df.empty:
    st.info("No measurements cached yet: run a sweep (or the claims test below) and this fills in.")
else:
    st.caption(f"Conditions: {chosen}")
    for (model, layer), g in df.groupby(["model", "layer"]):
        fractions = analysis.fraction_of_ideal(g)
        if len(fractions):
            st.markdown(f"*{model}, {layer} ({g['shape'].iloc[0]})*: " + ", ".join(
                f"{row.pattern} {row.fraction_of_ideal:.2f} ({row.measured} points)" for row in fractions.itertuples()))

st.markdown("**The best block shape moves with precision.** In float32 a tall block wins because one input is "
            "broadcast into the lanes of 32 rows (an FMA reduces nothing). The CPU's integer dot (AVX2's "
            "`vpmaddubsw` + `vpmaddwd`, AVX-512 VNNI's `vpdpbusd`) sums four u8 x s8 products of four "
            "*consecutive inputs* into each 32-bit lane: it reduces along the input dimension, so an INT8 block "
            "needs 4 input columns (32x4, 16x4, 1x4) and 32x1 does not run at all. From your own cached "
            "measurements at sparsity >= 0.8, each pattern's fraction of the ideal against the fastest dense "
            "kernel of its own precision (run Sweep with Precisions fp32 and int8 to fill both):")
if not df.empty:
    per_precision = analysis.best_block_per_precision(df)
    if per_precision.empty:
        st.info("No result at sparsity >= 0.8 under these conditions yet.")
    else:
        st.dataframe(per_precision, hide_index=True, key="learn_per_precision")

st.header("3. Break-even sparsity")
st.markdown("Each stored block costs an index lookup and, for small blocks, a partly empty vector. So a sparse "
            "kernel only wins above some sparsity: the **break-even sparsity**, where it starts to beat the best "
            "dense kernel. It needs measured points on both sides of 1x and is interpolated between them; with "
            "fewer points it says so. Per layer, from your cached measurements under the conditions chosen above.")
if df.empty:
    st.info("No measurements cached yet.")
else:
    for (model, layer), g in df.groupby(["model", "layer"]):
        st.markdown(f"**{model}, {layer} ({g['shape'].iloc[0]})**, {len(g)} results")
        st.dataframe(analysis.break_even(g), hide_index=True, key=f"breakeven_{model}_{layer}")

st.header("4. The paper's claims, tested on this machine")
st.markdown("*Algorithm to Compilation Co-design* (arXiv 2106.08846) pruned BERT-base with structured blocks and ran "
            "BSR kernels in TVM on a CPU: about **4x** faster than PyTorch dense and **2.2x** faster than standard "
            "TVM, **end to end on the whole model**, with linear 32x1 blocks beating square ones. The test below "
            "does the same: the whole model pruned with 32x1 blocks at 90%, run as one TVM executable of our "
            "kernels and timed in **one measurement** with TVM dense (the same graph, our scheduled dense kernels), "
            "PyTorch eager and ONNX Runtime. The paper's *standard TVM* was TVM's own tuned x86 dense schedule; "
            "TVM 0.27 has none (its default leaves a matmul unscheduled), so the dense TVM here is ours, and the "
            "kernel table below shows the default-scheduled figure too. The block-shape claim compares the 32x1 "
            "and 16x16 kernels of one BERT-base sized 768x768 layer, timed together.")
c1, c2 = st.columns(2)
claims_model = c1.selectbox("Model", MODEL_NAMES, index=MODEL_NAMES.index("bert-base-synthetic"), key="learn_model",
                            format_func=lambda n: f"{n}: {get_model(n).description}")
claims_tokens = c2.number_input("Tokens per sequence", 8, 512, 128, key="learn_tokens")
if st.button("Test the claims on this machine", type="primary", key="learn_test"):
    try:
        with st.status("Testing the claims...", expanded=True) as status:
            plan = ModelPlan(model=claims_model, block=(32, 1), sparsity=0.9, tokens=int(claims_tokens))
            whole, result = model_claims(plan, store=store(), progress=lambda step, detail: status.write(
                f"**{step}**: {detail}"))
            layer = layer_claims(tokens=int(claims_tokens), store=store(), progress=status.write)
            status.update(label="Measured", state="complete", expanded=False)
        st.dataframe(pd.DataFrame([vars(c) for c in whole + layer.claims[2:]]), hide_index=True, key="learn_claims")
        st.caption(f"Whole model: {analysis.model_conditions(result)}; one measurement, median of {plan.repeat} "
                   "samples." + (" Loaded from the cache." if result.cached else ""))
        names = {"linear": "TVM BSR 32x1", "square": "TVM BSR 16x16", **DENSE_TITLES}
        st.dataframe(pd.DataFrame([{"implementation": names[k], "median_us": t.median * 1e3, "spread_us": t.spread * 1e3}
                                   for k, t in layer.times_ms.items()]), hide_index=True, key="learn_claim_times")
        c = layer.conditions
        st.caption(f"One layer, one measurement: {c['cpu']}, {c['threads']} threads, {c['tokens']} tokens, "
                   f"{c['shape'][0]}x{c['shape'][1]}, TVM {c['tvm']}, PyTorch {c['torch']}; median of 15 samples.")
    except Exception as e:  # keep the page alive, say what failed
        st.error(f"The claims test failed: {type(e).__name__}: {e}")
