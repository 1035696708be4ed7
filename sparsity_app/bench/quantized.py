"""python -m sparsity_app bench-int8-accuracy: what INT8 costs MiniLM, dense and pruned, on every real-label metric.

Each plan's one-shot weights are evaluated three ways: in float32, and with every encoder linear computed
by the INT8 arithmetic of each integer dot (prune.quantize.int8_linear: per-row weight scales, per-token
activations; `vnni` keeps 8-bit activations, `avx2` 7-bit). The arithmetic is the kernels' own, bit for
bit, run in NumPy, so both dots are scored on any machine. Nothing here draws (no sparsegpt): one run
each is the figure. Verdict: dense INT8 within 0.01 of float32 on Lee Pearson and the polarity probe.
"""
from __future__ import annotations

import json

from sparsity_app.accuracy import metrics
from sparsity_app.core.requests import ModelPlan
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import pruned_weights
from sparsity_app.prune.quantize import LEVELS, int8_layers
from sparsity_app.runs import resolve
from sparsity_app.serve.report import rows_text, say

MODEL = "minilm-l6"
PLANS = {  # name -> plan (None: the dense model); INT8-runnable blocks (a multiple of 4 input columns)
    "dense": None,
    "16x4 at 50%": ModelPlan(method="block", block=(16, 4), sparsity=0.5),
    "wanda 16x4 at 50%": ModelPlan(method="wanda", block=(16, 4), sparsity=0.5),
    "32x4 at 90%": ModelPlan(method="block", block=(32, 4), sparsity=0.9),
}
JUDGED = ("lee_pearson", "polarity_probe_acc")  # the target: dense INT8 within 0.01 of fp32 on these
TOLERANCE = 0.01


def weights_of(plan: ModelPlan | None) -> dict:
    """layer -> float32 [out, in] of every encoder linear: the plan's one-shot pruned weights (a layer the plan
    leaves dense keeps its own), or every dense weight."""
    model = get_model(MODEL)
    dense = {info.name: model.weight(info.name)[0] for info in model.layers()}
    return dense if plan is None else {**dense, **pruned_weights(MODEL, resolve.plan(plan).specs)[1]}


def score(weights: dict, dot: str | None) -> dict[str, float]:
    """Every metric of the model with these linear weights, in float32 (dot None) or INT8 with `dot`."""
    model = get_model(MODEL)
    outputs = None if dot is None else int8_layers(weights, dot)
    return metrics.evaluate(model.pruned_copy(weights, outputs), model.tokenizer(), metrics.reference_embeddings(MODEL))


def main(args) -> int:
    rows, verdicts = [], []
    for name, plan in PLANS.items():
        if args.only and args.only not in name:
            continue
        say(f"{name}: pruning and scoring in fp32 and INT8 ({', '.join(LEVELS)})")
        weights = weights_of(plan)
        fp32 = score(weights, None)
        rows.append({"plan": name, "precision": "fp32", **fp32})
        for dot in LEVELS:
            got = score(weights, dot)
            rows.append({"plan": name, "precision": f"int8 ({dot})", **got})
            if plan is None:
                gaps = {m: got[m] - fp32[m] for m in JUDGED}
                ok = all(abs(g) <= TOLERANCE for g in gaps.values())
                verdicts.append(f"dense INT8 ({dot} arithmetic) within {TOLERANCE} of fp32 on "
                                f"{' and '.join(JUDGED)}: " + ", ".join(f"{m} {g:+.3f}" for m, g in gaps.items())
                                + f": {'MET' if ok else 'MISSED'}")
    if args.json:
        print(json.dumps({"rows": rows, "verdicts": verdicts}))
        return 0
    columns = ["plan", "precision", *metrics.METRICS]
    print(rows_text([{c: (f"{r[c]:.3f}" if isinstance(r[c], float) else r[c]) for c in columns} for r in rows]))
    print("single runs (nothing here draws); INT8 = every encoder linear by the kernels' arithmetic, in NumPy")
    print("\n".join(verdicts))
    return 0
