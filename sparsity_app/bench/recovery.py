"""python -m sparsity_app bench-recovery: the recovery issue's target runs, one after another, and
the verdict on each target. Every run is cached, so running it again trains nothing (scoring the
one-shot models and the probe spread take about a minute).

MiniLM, every encoder linear, `steps` steps of 16 x 128 tokens per run (the targets' protocol).
"""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np

from sparsity_app.accuracy import metrics
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ModelPlan, RecoveryRequest, ResolvedRecovery
from sparsity_app.core.store import Store
from sparsity_app.measure.timing import fingerprint
from sparsity_app.model import catalog
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import pruned_weights
from sparsity_app.runs import resolve
from sparsity_app.runs.recover import STEPS, recover
from sparsity_app.serve.report import format_recovery, mean_sd, rows_text, say, steps_to_stderr

BLOCK_50 = ModelPlan(method="block", block=(32, 1), sparsity=0.5)
BLOCK_90 = ModelPlan(method="block", block=(32, 1), sparsity=0.9)
NM_24 = ModelPlan(method="nm", nm=(2, 4))
SPARSEGPT_90 = ModelPlan(method="sparsegpt", block=(32, 1), sparsity=0.9)  # recovery from reconstructed weights
RUNS = (  # in priority order: each target's deciding runs first
    (BLOCK_50, "fixed"), (BLOCK_50, "mask-decay"), (BLOCK_90, "fixed"), (BLOCK_90, "gradual"),
    (SPARSEGPT_90, "fixed"), (SPARSEGPT_90, "gradual"),
    (BLOCK_90, "mask-decay"), (BLOCK_90, "group-lasso"), (NM_24, "sr-ste"), (NM_24, "mask-decay"),
    (NM_24, "structure-decay"), (NM_24, "fixed"), (BLOCK_50, "gradual"), (BLOCK_50, "group-lasso"),
)
DRAWS = (0, 1, 2)  # the fixed protocol: every target is judged on the mean over these training seeds
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


def stored_runs(todo: list[RecoveryRequest | ResolvedRecovery], store, code: str | None = None
                ) -> tuple[list, str | None]:
    """(the stored RecoveryResults of `todo` made by one recovery code version, that version).

    The version `code` (a prefix of it), or else the one with the most of them; results of different code
    versions are never mixed.
    Only this machine's results count (same CPU and packages; the code hash aside).
    """
    here = {k: v for k, v in fingerprint().items() if k != "code"}
    wanted = {(r if isinstance(r, ResolvedRecovery) else resolve.recovery(r)).request: i for i, r in enumerate(todo)}
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


def probe_spread(weights: dict | None, assignments: int = 20) -> dict[str, float]:
    """The polarity probe of MiniLM with these linear weights (layer -> float32 [out, in]; None = dense)
    under `assignments` draws of its folds (metrics.polarity_probe_acc with folds_seed 0..n-1) on the
    embeddings the metric scores (every evaluation text embedded together, as metrics.evaluate does).
    -> {"mean", "sd", "min", "max", "draw0"} ("draw0": the metric's own draw). How far a probe figure
    moves with the draw of its folds alone, next to a target 0.01 away."""
    model = get_model("minilm-l6")
    dense = metrics.reference_embeddings("minilm-l6")
    own = dense if weights is None else catalog.hf().embed(model.pruned_copy(weights), model.tokenizer(),
                                                           metrics.eval_texts())
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
    model, resolved = get_model(plan.model), resolve.plan(plan)
    _, weights = pruned_weights(resolved.plan.model, resolved.specs)
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
    from_sparsegpt = [(recipe, v) for recipe in ("fixed", "gradual") if (v := lee(SPARSEGPT_90, recipe)) is not None]
    if not from_sparsegpt:
        lines.append("32x1 at 90% from sparsegpt: not run")
    else:
        recipe, value = max(from_sparsegpt, key=lambda rv: rv[1])
        mask_only = max((v for r in ("fixed", "gradual", "mask-decay", "group-lasso") if (v := lee(BLOCK_90, r)) is not None),
                        default=None)
        versus = "" if mask_only is None else f"; the best from block's masks: {mask_only:.3f} ({value - mask_only:+.3f})"
        lines.append(f"32x1 at 90% from sparsegpt: best recipe {recipe} Lee {value:.3f} (target >= 0.57){versus}: "
                     f"{'met' if value >= 0.57 else 'MISSED'}")
    return lines


def across_seeds(by_seed: dict[int, list]) -> tuple[list[dict], list[str]]:
    """The target runs of several training seeds side by side: (rows, the target verdicts on their means).

    by_seed: training seed -> its RecoveryResults (of `requests(..., seed=seed)`). rows: one per target run
    stored at every seed, in the order of the first seed's results: plan, recipe, and for Lee and the probe
    each seed's figure (lee_seed0, ...), their mean and sd (population). The verdicts judge each run's mean;
    a run missing at some seed is in neither. The targets themselves are judged on one run at seed 0: this
    says how much of a verdict that seed decides.
    """
    seeds = sorted(by_seed)
    keyed = {s: {(r.request.plan.label(), r.request.recipe): r for r in by_seed[s]} for s in seeds}
    rows, means = [], []
    for key, first in (keyed[seeds[0]] if seeds else {}).items():
        if not all(key in keyed[s] for s in seeds):
            continue
        row, mean = {"plan": key[0], "recipe": key[1]}, {}
        for metric, short in (("lee_pearson", "lee"), ("polarity_probe_acc", "probe")):
            values = [keyed[s][key].metrics_after[metric] for s in seeds]
            mean[metric], sd = mean_sd(values)
            row |= {f"{short}_seed{s}": round(v, 3) for s, v in zip(seeds, values)}
            row |= {f"{short}_mean": round(mean[metric], 3), f"{short}_sd": round(sd, 3)}
        rows.append(row)
        means.append(SimpleNamespace(request=first.request, metrics_after=mean))
    return rows, target_verdicts(means, f"means of {len(seeds)} seeds each")


def _recovered(resolved: ResolvedRecovery, store):
    return recover(resolved, store=store, progress=steps_to_stderr(STEPS))


def main(args) -> int:
    store, results = Store(args.cache_dir), []
    asked = [(knob, v) for knob in PROBES if (v := getattr(args, f"probe_{knob}")) is not None]
    if len(asked) > 1:
        raise UserError("probe one knob at a time: " + " or ".join(f"--probe-{k}" for k in PROBES))
    if args.code is not None and (not args.stored or not args.code):
        raise UserError("--code names the stored runs to print (a non-empty prefix of a code version): use it with "
                        "--stored")
    if args.stored and asked:
        raise UserError("--stored trains nothing, a probe trains: use one or the other")
    if args.across_seeds is not None and args.train_seed is not None:
        raise UserError("--across-seeds names the seeds itself: leave out --train-seed")
    if asked and args.across_seeds is not None:
        raise UserError("a probe trains at one seed (the default order): leave out --across-seeds")
    if not asked and args.train_seed is None:  # the fixed protocol: every target run at seeds 0, 1, 2, judged on the means
        return _main_across_seeds(args, store, args.across_seeds or DRAWS)
    knob, given = asked[0] if asked else ("lr", None)
    field = PROBES[knob][1]  # the RecoveryRequest field the probe varies
    if given is not None:
        try:
            values = [float(v) for v in given.split(",")]
        except ValueError:
            raise UserError(f"--probe-{knob} takes comma-separated numbers, got {given!r}") from None
        # every bad value said before anything trains
        probes = [resolve.recovery(r) for r in probe_requests(values, args.probe_steps, args.probe_loss, knob,
                                                              args.lengths)]
        rows = []
        for resolved in probes:
            request = resolved.request
            say(f"[probe] {request.label()}, {knob} {getattr(request, field):g}, "
                f"lr {request.lr:g}, loss {request.loss}")
            r = _recovered(resolved, store)
            rows.append({knob: getattr(request, field), "recipe": request.recipe,
                         "loss": request.loss, "steps": r.steps_done, "train_s": round(r.wall_s),
                         "last_loss": r.loss[-1][1], "fidelity": round(metrics.fidelity(
                             store.recovered_weights(r.key)[0]), 4), "lee": round(r.metrics_after["lee_pearson"], 3),
                         "probe": round(r.metrics_after["polarity_probe_acc"], 3)})
        if args.json:
            print(json.dumps(rows))
        else:
            print(rows_text(rows))
        return 0
    seed = RecoveryRequest.seed if args.train_seed is None else args.train_seed
    todo = [resolve.recovery(r) for r in requests(args.steps, args.only, args.lengths, seed)]  # a bad flag: one line
    if args.stored:
        results, code = stored_runs(todo, store, args.code)
        say(f"{len(results)} of {len(todo)} target runs stored by code version {code}" if results else
            "no target run is stored on this machine" + (f" by code version {args.code}" if args.code else ""))
        todo = []
    results += _train(todo, store)
    one_shot = []
    if not args.skip_one_shot:
        for magnitude, wanda in ONE_SHOT:
            say(f"[one-shot] {magnitude.label()} vs {wanda.label()}")
            one_shot.append((magnitude.label(), one_shot_metrics(magnitude)["lee_pearson"],
                             one_shot_metrics(wanda)["lee_pearson"]))
    lines, spread = verdicts(results, one_shot), []
    lines = [f"training seed {seed} (one seed: reported, not judged): {line}" for line in lines]
    if not args.skip_probe_spread:
        say("[probe spread] the polarity probe of the dense model and each 32x1-at-50% run, 20 draws of its folds")
        spread = probe_spread_lines(results, store)
    if args.json:
        print(json.dumps({"runs": [r.to_dict() for r in results], "one_shot": one_shot, "verdicts": lines,
                          "probe_spread": spread}))
    else:
        print("\n".join([rows_text([{"plan": r.request.plan.label(), "recipe": r.request.recipe, "steps": r.steps_done,
                                     "wall_min": round(r.wall_s / 60, 1),
                                     **{f"{k}_{when}": round(getattr(r, f"metrics_{when}")[k], 3)
                                         for k in ("lee_pearson", "polarity_probe_acc") for when in ("before", "after")}}
                                    for r in results]), *lines, *spread]))
    return 0


def _train(todo: list[ResolvedRecovery], store) -> list:
    """The runs of `todo`, one after another (each cached); one that cannot go says why, the others go on."""
    results = []
    for i, resolved in enumerate(todo, 1):
        say(f"[run {i}/{len(todo)}] {resolved.request.label()}")
        try:
            results.append(_recovered(resolved, store))
        except UserError as e:  # one run that cannot go (e.g. stopped): say so, keep the others
            say(f"  {e}")
            continue
        say(format_recovery(results[-1].to_dict()))
    return results


def _main_across_seeds(args, store, seed_list: tuple[int, ...]) -> int:
    """The fixed protocol: every target run at each training seed (trained now, or with --stored only read:
    one code version), side by side, verdicts on the means."""
    todo = {seed: [resolve.recovery(r) for r in requests(args.steps, args.only, args.lengths, seed)]
            for seed in seed_list}  # every bad flag said before anything trains
    by_seed, code = {}, args.code
    for seed in seed_list:
        if args.stored:
            by_seed[seed], found = stored_runs(todo[seed], store, code)
            code = code or found  # the first seed with runs fixes the code version: never mixed across versions
            say(f"training seed {seed}: {len(by_seed[seed])} of {len(todo[seed])} target runs stored"
                + (f" by code version {found}" if found else ""))
        else:
            say(f"training seed {seed}: {len(todo[seed])} target runs")
            by_seed[seed] = _train(todo[seed], store)
    rows, mean_lines = across_seeds(by_seed)
    seeds = ", ".join(map(str, seed_list))
    lines = [f"training seed {seed} (reported): {line}" for seed, runs in by_seed.items()
             for line in target_verdicts(runs)]
    lines += [f"mean over training seeds {seeds} (judged): {line}" for line in mean_lines]
    if args.json:
        print(json.dumps({"seeds": list(seed_list), "code": code, "rows": rows, "verdicts": lines}))
    else:
        table = rows_text(rows) if rows else f"no target run is stored at every seed ({seeds})"
        print("\n".join([table, *lines]))
    return 0


__all__ = ["RUNS", "DRAWS", "ONE_SHOT", "PROBES", "requests", "probe_requests", "probe_spread", "probe_spread_lines",
           "one_shot_metrics", "verdicts", "target_verdicts", "across_seeds", "main"]
