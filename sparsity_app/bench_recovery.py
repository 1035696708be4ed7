"""python -m sparsity_app bench-recovery: the recovery issue's target runs, one after another, and
the verdict on each target. Every run is cached, so running it again trains nothing (scoring the
one-shot models and the probe spread take about a minute).

MiniLM, every encoder linear, `steps` steps of 16 x 128 tokens per run (the targets' protocol).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .errors import UserError
from .recovery import RecoveryRequest
from .spec import ModelPlan

BLOCK_50 = ModelPlan(method="block", block=(32, 1), sparsity=0.5)
BLOCK_90 = ModelPlan(method="block", block=(32, 1), sparsity=0.9)
NM_24 = ModelPlan(method="nm", nm=(2, 4))
RUNS = (  # in priority order: each target's deciding runs first
    (BLOCK_50, "fixed"), (BLOCK_50, "mask-decay"), (BLOCK_90, "fixed"), (BLOCK_90, "gradual"),
    (BLOCK_90, "mask-decay"), (BLOCK_90, "group-lasso"), (NM_24, "sr-ste"), (NM_24, "mask-decay"),
    (NM_24, "structure-decay"), (NM_24, "fixed"), (BLOCK_50, "gradual"), (BLOCK_50, "group-lasso"),
)
ONE_SHOT = (  # wanda against magnitude, one-shot (no training)
    (ModelPlan(method="magnitude", block=(1, 1), sparsity=0.5), ModelPlan(method="wanda", block=(1, 1), sparsity=0.5)),
    (ModelPlan(method="nm", nm=(2, 4)), ModelPlan(method="wanda", nm=(2, 4))),
    (ModelPlan(method="block", block=(32, 1), sparsity=0.5), ModelPlan(method="wanda", block=(32, 1), sparsity=0.5)),
)


def requests(steps: int, only: str | None = None, lengths: str = RecoveryRequest.lengths,
             seed: int = RecoveryRequest.seed) -> list[RecoveryRequest]:
    """The target runs (optionally only those whose plan label or recipe contains `only`), their data
    order drawn with training seed `seed` (the targets are judged at the default; another seed shows
    how much of a verdict is that draw)."""
    out = [RecoveryRequest(plan=plan, recipe=recipe, steps=steps, lengths=lengths, seed=seed) for plan, recipe in RUNS]
    return [r for r in out if only is None or only in r.plan.label() or only == r.recipe]


def stored_runs(todo: list[RecoveryRequest], store, code: str | None = None) -> tuple[list, str | None]:
    """(the stored RecoveryResults of `todo` made by one recovery code version, that version).

    The version `code` (a prefix of it), or else the one with the most of them; results of different code
    versions are never mixed.
    Only this machine's results count (same CPU and packages; the code hash aside).
    """
    from .timing import fingerprint

    here = {k: v for k, v in fingerprint().items() if k != "code"}
    wanted = {r.resolve(): i for i, r in enumerate(todo)}
    by_code: dict[str, dict[int, object]] = {}
    for result in store.recoveries():
        if result.request in wanted and {k: v for k, v in result.machine.items() if k != "code"} == here:
            by_code.setdefault(result.machine.get("code"), {})[wanted[result.request]] = result
    if code is not None:
        by_code = {c: found for c, found in by_code.items() if c and c.startswith(code)}
        if len(by_code) > 1:
            raise UserError(f"code version {code!r} is ambiguous: {', '.join(sorted(by_code))}")
    if not by_code:
        return [], None
    code, found = max(by_code.items(), key=lambda kv: len(kv[1]))
    return [found[i] for i in sorted(found)], code


# What a probe varies: knob -> (the recipe it belongs to, the RecoveryRequest field, the plan of the target that
# recipe is there for). Each value is chosen by `fidelity`, never by a metric.
PROBES = {"lr": ("fixed", "lr", BLOCK_50), "group-lasso": ("group-lasso", "group_lasso", BLOCK_50),
          "decay-fraction": ("gradual", "decay_fraction", BLOCK_90)}


def probe_requests(values: list[float], steps: int, loss: str, knob: str = "lr",
                   lengths: str = RecoveryRequest.lengths) -> list[RecoveryRequest]:
    """A probe: short runs of the knob's recipe and plan, one per value of the knob (PROBES)."""
    recipe, field, plan = PROBES[knob]
    return [dataclasses.replace(RecoveryRequest(plan=plan, recipe=recipe, steps=steps, loss=loss, lengths=lengths),
                                **{field: v}) for v in values]


def fidelity(weights: dict) -> float:
    """Mean cosine between the sentence embeddings of MiniLM with these linear weights (layer -> float32
    [out, in]) and the dense model's, averaged over inputs of 16, 32, 64 and 128 tokens: 256 training
    sequences (every 18th of `training_sequences(128)`), each also cut to its first 14, 30 and 62 word
    pieces between [CLS] and [SEP]. Unlabelled training text, so a setting chosen by it never looked at an
    evaluation text or label; short inputs count because the metrics embed sentences and single words."""
    import torch

    from .models import get_model
    from .recovery import training_sequences

    model = get_model("minilm-l6")
    seqs = training_sequences(128)[::18][:256]

    def pooled(m, length: int):
        ids = torch.from_numpy(np.concatenate([seqs[:, :length - 1], seqs[:, -1:]], axis=1))
        with torch.inference_mode():
            return torch.cat([m(input_ids=ids[i:i + 32]).last_hidden_state.mean(1) for i in range(0, len(ids), 32)])

    student, dense = model.pruned_copy(weights), model.torch_model()
    return float(np.mean([torch.nn.functional.cosine_similarity(pooled(student, n), pooled(dense, n)).mean()
                          for n in (16, 32, 64, 128)]))


def probe_spread(weights: dict | None, assignments: int = 20) -> dict[str, float]:
    """The polarity probe of MiniLM with these linear weights (layer -> float32 [out, in]; None = dense)
    under `assignments` draws of its folds (metrics.polarity_probe_acc with folds_seed 0..n-1) on the
    embeddings the metric scores (every evaluation text embedded together, as metrics.evaluate does).
    -> {"mean", "sd", "min", "max", "draw0"} ("draw0": the metric's own draw). How far a probe figure
    moves with the draw of its folds alone, next to a target 0.01 away."""
    from . import metrics
    from .models import get_model

    model = get_model("minilm-l6")
    dense = metrics.reference_embeddings("minilm-l6")
    own = dense if weights is None else metrics.embed(model.pruned_copy(weights), model.tokenizer(), metrics.eval_texts())
    e = metrics.Embeddings.split(own, dense)
    accs = [metrics.polarity_probe_acc(e, seed) for seed in range(assignments)]
    return {"mean": float(np.mean(accs)), "sd": float(np.std(accs)), "min": min(accs), "max": max(accs),
            "draw0": accs[0]}


def probe_spread_lines(results: list, store) -> list[str]:
    """One line for the dense model and one per 32x1-at-50% run in `results` (its stored weights); none
    without such a run."""
    def line(name: str, spread: dict[str, float], reported: float) -> str:
        return (f"  {name}: reported {reported:.3f} (draw 0 here: {spread['draw0']:.3f}); over 20 draws of the folds "
                f"mean {spread['mean']:.3f}, sd {spread['sd']:.3f}, {spread['min']:.3f} to {spread['max']:.3f}")

    runs = [r for r in results if r.request.plan.label() == BLOCK_50.label()]
    if not runs:
        return []
    lines = ["32x1 at 50%, the polarity probe under 20 draws of its 10 folds (how much of a figure is the draw):",
             line("dense", probe_spread(None), runs[0].dense_metrics["polarity_probe_acc"])]
    for r in runs:
        lines.append(line(r.request.recipe, probe_spread(store.recovered_weights(r.key)[0]),
                          r.metrics_after["polarity_probe_acc"]))
    return lines


def one_shot_metrics(plan: ModelPlan) -> dict[str, float]:
    """Real-label metrics of the plan's one-shot pruned MiniLM (no timing, no training)."""
    from . import metrics
    from .models import get_model
    from .model_experiment import pruned_weights

    model = get_model(plan.model)
    _, weights = pruned_weights(plan)
    return metrics.evaluate(model.pruned_copy(weights), model.tokenizer(), metrics.reference_embeddings(plan.model))


def verdicts(results: list, one_shot: list[tuple[str, float, float]]) -> list[str]:
    """One line per target, from the runs done so far (a target without its runs says so).

    results: RecoveryResult of `requests`; one_shot: (pattern, magnitude Lee, wanda Lee).
    """
    lines = target_verdicts(results)
    for pattern, magnitude, wanda in one_shot:
        lines.append(f"one-shot {pattern}: wanda Lee {wanda:.3f} vs magnitude {magnitude:.3f}: {wanda - magnitude:+.3f}")
    timed = [r for r in results if r.steps_done == 300 and not r.resumed_from]  # whole runs of the target's length
    if timed:
        totals = sorted((r.wall_s + r.eval_s) / 60 for r in timed)
        met = sum(t <= 10 for t in totals)
        lines.append(f"300-step runs, training + scoring: {totals[0]:.1f} to {totals[-1]:.1f} min, median "
                     f"{totals[len(totals) // 2]:.1f} (target <= 10): met by {met} of {len(totals)} (each measured "
                     "when it ran, with whatever else the machine was running then)")
    return lines


def target_verdicts(results: list, each: str = "one seed each") -> list[str]:
    """The recovered-accuracy targets' lines (32x1 at 50%, at 90%, 2:4), from `results`: anything with
    `request` (a RecoveryRequest) and `metrics_after` (lee_pearson, polarity_probe_acc), a RecoveryResult
    or a mean over seeds (`across_seeds`). `each`: what one figure is, where a tie is called."""
    by = {(r.request.plan.label(), r.request.recipe): r for r in results}

    def lee(plan, recipe):
        r = by.get((plan.label(), recipe))
        return None if r is None else r.metrics_after["lee_pearson"]

    lines = []
    runs50 = [r for (p, _), r in by.items() if p == BLOCK_50.label()]

    def meets(r) -> bool:
        return r.metrics_after["lee_pearson"] >= 0.63 and r.metrics_after["polarity_probe_acc"] >= 0.70

    if not runs50:
        lines.append("32x1 at 50%: not run")
    else:  # a recipe that meets both targets if one does, else the best on Lee
        best50 = max(runs50, key=lambda r: (meets(r), r.metrics_after["lee_pearson"]))
        a = best50.metrics_after
        lines.append(f"32x1 at 50%, best recipe {best50.request.recipe}: Lee {a['lee_pearson']:.3f} (target >= 0.63), "
                     f"probe {a['polarity_probe_acc']:.3f} (target >= 0.70): {'met' if meets(best50) else 'MISSED'}"
                     + "".join(f"; {r.request.recipe}: Lee {r.metrics_after['lee_pearson']:.3f}, probe "
                               f"{r.metrics_after['polarity_probe_acc']:.3f}" for r in runs50 if r is not best50))
    fixed90 = lee(BLOCK_90, "fixed")
    others = [(recipe, lee(BLOCK_90, recipe)) for recipe in ("gradual", "mask-decay", "group-lasso")]
    others = [(r, v) for r, v in others if v is not None]
    if fixed90 is None or not others:
        lines.append("32x1 at 90%: fixed or every other recipe not run")
    else:
        recipe, value = max(others, key=lambda rv: rv[1])
        lines.append(f"32x1 at 90%: best recipe {recipe} Lee {value:.3f} vs fixed {fixed90:.3f}: "
                     f"{value - fixed90:+.3f} (target >= +0.05): {'met' if value - fixed90 >= 0.05 else 'MISSED'}")
    ste = lee(NM_24, "sr-ste")
    for recipe in ("mask-decay", "structure-decay"):
        v = lee(NM_24, recipe)
        verdict = None if v is None or ste is None else f"ties with sr-ste (within 0.01, {each})" \
            if abs(v - ste) < 0.01 else "beats sr-ste" if v > ste else "does not beat sr-ste"
        lines.append(f"2:4: {recipe} Lee " + ("not run" if verdict is None else
                                               f"{v:.3f} vs sr-ste {ste:.3f}: {v - ste:+.3f} ({verdict})"))
    return lines


def across_seeds(by_seed: dict[int, list]) -> tuple[list[dict], list[str]]:
    """The target runs of several training seeds side by side: (rows, the target verdicts on their means).

    by_seed: training seed -> its RecoveryResults (of `requests(..., seed=seed)`). rows: one per target run
    stored at every seed, in the order of the first seed's results: plan, recipe, and for Lee and the probe
    each seed's figure (lee_seed0, ...), their mean and sd (population). The verdicts judge each run's mean;
    a run missing at some seed is in neither. The targets themselves are judged on one run at seed 0: this
    says how much of a verdict that seed decides.
    """
    from types import SimpleNamespace

    seeds = sorted(by_seed)
    keyed = {s: {(r.request.plan.label(), r.request.recipe): r for r in by_seed[s]} for s in seeds}
    rows, means = [], []
    for key, first in (keyed[seeds[0]] if seeds else {}).items():
        if not all(key in keyed[s] for s in seeds):
            continue
        row, mean = {"plan": key[0], "recipe": key[1]}, {}
        for metric, short in (("lee_pearson", "lee"), ("polarity_probe_acc", "probe")):
            values = [keyed[s][key].metrics_after[metric] for s in seeds]
            mean[metric] = float(np.mean(values))
            row |= {f"{short}_seed{s}": round(v, 3) for s, v in zip(seeds, values)}
            row |= {f"{short}_mean": round(mean[metric], 3), f"{short}_sd": round(float(np.std(values)), 3)}
        rows.append(row)
        means.append(SimpleNamespace(request=first.request, metrics_after=mean))
    return rows, target_verdicts(means, f"means of {len(seeds)} seeds each")


__all__ = ["RUNS", "ONE_SHOT", "PROBES", "requests", "probe_requests", "fidelity", "probe_spread", "probe_spread_lines",
           "one_shot_metrics", "verdicts", "target_verdicts", "across_seeds"]
