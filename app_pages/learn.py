"""Learn: what BSR stores, why block shape decides whether sparsity pays on a CPU, and the paper's claims."""
import pandas as pd
import streamlit as st

from app_pages.common import conditions, run_with_status, store
from sparsity_app import Spec, analysis
from sparsity_app.spec import fmt_block
from sparsity_app.teach import PAPER_CLAIMS, bsr_example

st.title("Learn: why block shape decides whether sparsity pays off")

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
c1.dataframe(pd.DataFrame(w).where(mask).style.format(precision=1, na_rep=""), key="learn_weight")
c2.markdown(f"**indptr** ({bsr.indptr.size} entries, one per block row + 1)")
c2.code(str(bsr.indptr.tolist()))
c2.markdown(f"**indices** ({bsr.indices.size} stored blocks)")
c2.code(str(bsr.indices.tolist()))
c2.markdown(f"**data** shape {list(bsr.data.shape)}: {bsr.data.size} values for {int(mask.sum())} kept weights; "
            f"{bsr.nbytes} bytes vs {w.nbytes} dense")
c2.code(str(bsr.data[:2].tolist()) + (" ..." if bsr.nnz_blocks > 2 else ""))

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
            "tokens, but then every stored weight needs its own load of a row of X, which caps 1x32 and 1x1 "
            "near half the ideal speedup on this CPU. On **Explore**, open *Schedule* under a result to see "
            "which schedule the tuner picked and by how much it beat the untuned default.")

st.header("3. Break-even sparsity")
st.markdown("Each stored block costs an index lookup and, for small blocks, a partly empty vector. So a sparse "
            "kernel only wins above some sparsity: the **break-even sparsity**, the lowest sparsity at which it "
            "beats the best dense kernel. Below are your own cached measurements.")
df = analysis.frame(store().results())
if df.empty:
    st.info("No measurements cached yet: run a sweep, or the test below.")
else:
    for (model, shape), g in df.groupby(["model", "shape"]):
        st.markdown(f"**{model}, {shape} layers** ({len(g)} results)")
        st.dataframe(analysis.break_even(g), hide_index=True, key=f"breakeven_{model}_{shape}")

st.header("4. The paper's claims, tested on this machine")
st.markdown("*Algorithm to Compilation Co-design* (arXiv 2106.08846) pruned BERT's attention weights with "
            "structured blocks and ran BSR kernels in TVM on a CPU. Its findings, as claims you can test here "
            "on a BERT-base sized 768x768 layer (seeded random weights: only the timings mean something):")
for _, target, text in PAPER_CLAIMS:
    st.markdown(f"- {text}")
st.markdown("- linear 32x1 blocks beat square 16x16 blocks at the same sparsity")
if st.button("Test the claims on this machine", type="primary", key="learn_test"):
    layer = "encoder.layer.0.attention.self.query"
    linear = run_with_status(Spec(model="bert-base-synthetic", layer=layer, block=(32, 1), sparsity=0.9))
    square = run_with_status(Spec(model="bert-base-synthetic", layer=layer, block=(16, 16), sparsity=0.9))
    if linear and square:
        rows = [{"claim": text, "paper": f"{target:.1f}x", "measured (32x1, 90%)": f"{getattr(linear, key):.2f}x",
                 "holds here": getattr(linear, key) >= target} for key, target, text in PAPER_CLAIMS]
        rows.append({"claim": "32x1 beats 16x16 at 90%", "paper": "yes",
                     "measured (32x1, 90%)": f"{linear.speedup_vs_tvm_dense:.2f}x vs {square.speedup_vs_tvm_dense:.2f}x "
                                             "(vs TVM dense)",
                     "holds here": linear.times_ms["tvm_bsr"].median < square.times_ms["tvm_bsr"].median})
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="learn_claims")
        st.caption(conditions(linear))
