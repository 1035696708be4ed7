"""Pure functions over result tables (pandas DataFrames of `Result.row()`), for the app and CLI."""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable

import numpy as np
import pandas as pd

from sparsity_app.accuracy import metrics
from sparsity_app.core.results import SPARSE, Result, conditions_label
from sparsity_app.measure.timing import code_version


def frame(results: Iterable[Result]) -> pd.DataFrame:
    """One row per result (`Result.row`), sorted by pattern and sparsity.

    Rows measured under different conditions (see `by_conditions`) must not share a chart or a
    break-even: pass the results of one condition set.
    """
    df = pd.DataFrame([r.row() for r in results])
    if df.empty:
        return df
    return df.sort_values(["pattern", "sparsity_target"]).reset_index(drop=True)


def by_conditions(results: Iterable[Result], prefer: Result | None = None) -> dict[str, list[Result]]:
    """Results grouped by their measurement conditions (machine, code, threads, tokens, samples).

    Keys are `conditions_label`s, the group of `prefer` first, then the larger groups first: a
    chart shows one group and offers the others as an explicit choice.
    """
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(conditions_label(r.conditions()), []).append(r)
    first = conditions_label(prefer.conditions()) if prefer is not None else None
    order = sorted(groups, key=lambda k: (k != first, -len(groups[k]), k))
    return {k: groups[k] for k in order}


def device_frame(results: Iterable[Result], grid: Iterable, code: str | None = None) -> pd.DataFrame:
    """The results of the configurations in `grid` on every device that measured them: one row per
    (device, configuration) (`Result.row`, its `device` column naming where it was timed), sorted by
    device, pattern and sparsity.

    grid: resolved Specs; a result matches one whatever its thread count (each device resolves
    "all cores" to its own). code: only results of this code hash (default: the current code), so
    each device contributes one measurement per configuration.
    """
    code = code or code_version()
    wanted = {dataclasses.replace(s, threads=0) for s in grid}
    rows = [r.row() for r in results
            if r.machine.get("code") == code and dataclasses.replace(r.spec, threads=0) in wanted]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["device", "pattern", "sparsity_target"]).reset_index(drop=True)


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where no other point has x >= and y >= with one strictly greater (both maximised)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.ones(len(x), bool)
    for i in range(len(x)):
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        keep[i] = not dominated.any()
    return keep


def _sound(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose timings are figures: results marked noisy (Result.noisy) never make a verdict."""
    return df[~df["noisy"].fillna(False).astype(bool)] if "noisy" in df else df


def break_even(df: pd.DataFrame, speedup: str = "speedup_vs_best_dense") -> pd.DataFrame:
    """Per pattern: the sparsity at which the sparse kernel starts to beat dense (speedup 1x).

    Needs measured points on both sides of 1x: it is interpolated (linearly in sparsity, in log
    speedup) between the two points that bracket the first crossing from below. Otherwise it says
    "below the lowest sparsity measured", "not reached", or "not determined" (one point).
    Columns: pattern, break_even_sparsity (NaN unless interpolated), verdict, measured.
    Raises ValueError for rows from more than one set of conditions.
    """
    if "conditions" in df and df["conditions"].nunique() > 1:
        raise ValueError("break_even needs results measured under one set of conditions "
                         f"(got {df['conditions'].nunique()})")
    df = _sound(df)
    rows = []
    for pattern, g in df.groupby("pattern"):
        g = g.sort_values("sparsity_achieved")
        s, y = g["sparsity_achieved"].to_numpy(float), g[speedup].to_numpy(float)
        value, verdict = np.nan, None
        if len(g) < 2:
            verdict = f"not determined: one point measured ({s[0]:.2f}), needs points on both sides of 1x"
        elif y[0] >= 1:
            verdict = f"below the lowest sparsity measured ({s[0]:.2f})"
        elif (y < 1).all():
            verdict = f"not reached (up to {s[-1]:.2f})"
        else:
            i = int(np.argmax(y >= 1))  # first point that beats dense; the one before it does not
            t = (0 - np.log(y[i - 1])) / (np.log(y[i]) - np.log(y[i - 1]))
            value = float(s[i - 1] + t * (s[i] - s[i - 1]))
            verdict = f"{value:.2f} (interpolated between {s[i - 1]:.2f} and {s[i]:.2f})"
        rows.append({"pattern": pattern, "break_even_sparsity": value, "verdict": verdict, "measured": len(g)})
    return pd.DataFrame(rows, columns=["pattern", "break_even_sparsity", "verdict", "measured"])


def fraction_of_ideal(df: pd.DataFrame, min_sparsity: float = 0.8) -> pd.DataFrame:
    """Per pattern: median fraction of the ideal speedup 1/(1-s) at sparsity >= min_sparsity.

    Columns: pattern, fraction_of_ideal, measured. From measurements, for prose that quotes them.
    """
    df = _sound(df)
    high = df[df["sparsity_achieved"] >= min_sparsity - 1e-9]
    if high.empty:
        return pd.DataFrame(columns=["pattern", "fraction_of_ideal", "measured"])
    return (high.groupby("pattern")["fraction_of_ideal"].agg(["median", "size"]).reset_index()
            .rename(columns={"median": "fraction_of_ideal", "size": "measured"})
            .sort_values("fraction_of_ideal", ascending=False).reset_index(drop=True))


def best_block_per_precision(df: pd.DataFrame, min_sparsity: float = 0.8) -> pd.DataFrame:
    """Per precision, every pattern's median fraction of the ideal 1/(1-s) against the fastest dense of
    that precision (`Result.best_dense_same_precision`), at sparsity >= min_sparsity, best first; noisy
    results left out. Columns: precision, pattern, fraction of ideal, measured, best (the first of its
    precision, and only when it rests on two or more points)."""
    columns = ["precision", "pattern", "fraction of ideal", "measured", "best"]
    df = _sound(df)
    if df.empty or "fraction_of_ideal_same_precision" not in df:
        return pd.DataFrame(columns=columns)
    high = df[df["sparsity_achieved"] >= min_sparsity - 1e-9].assign(precision=lambda d: d["precision"].fillna("fp32"))
    if high.empty:
        return pd.DataFrame(columns=columns)
    table = (high.groupby(["precision", "pattern"])["fraction_of_ideal_same_precision"].agg(["median", "size"])
             .reset_index().rename(columns={"median": "fraction of ideal", "size": "measured"})
             .sort_values(["precision", "fraction of ideal"], ascending=[True, False]).reset_index(drop=True))
    first = ~table["precision"].duplicated()
    table["best"] = np.where(first & (table["measured"] >= 2), "best", np.where(first, "one point: no verdict", ""))
    table["fraction of ideal"] = table["fraction of ideal"].round(2)
    return table[columns]


def kernel_title(result: Result) -> str:
    """'TVM BSR', 'TVM CSR' or 'TVM N:M': the sparse kernel the result timed."""
    title = result.kernel.get("title")  # the kernel family's, recorded by the run
    return f"TVM {title}" if title else "TVM sparse"


def tuning_frame(result: Result) -> pd.DataFrame:
    """The tuner's trials for this result, fastest first: schedule, median us, x slower than the winner."""
    tuning = result.kernel.get("tuning") or {}
    trials = tuning.get("trials", [])
    if not trials:
        return pd.DataFrame(columns=["schedule", "median_us", "vs_winner", "round"])
    best = min(t["median_ms"] for t in trials)
    return pd.DataFrame([{"schedule": t["label"], "median_us": t["median_ms"] * 1e3,
                          "vs_winner": t["median_ms"] / best, "round": t["round"]} for t in trials])


def same_pattern_frame(result: Result) -> pd.DataFrame:
    """A reconstructing method's layer run: one row per way of pruning its pattern to its density
    (Result.same_pattern), its own first, with readable headers and 3-decimal figures."""
    return pd.DataFrame([{"pruned by": name, "layer output cosine": round(s["output_cosine"], 3),
                          "layer output relative error": round(s["output_rel_error"], 3)}
                         for name, s in (result.same_pattern or {}).items()])


def model_conditions(result) -> str:
    """Measurement conditions of a whole-model result, as one line (results compare only within one)."""
    m, p = result.machine, result.plan
    isa = m.get("isa") or []
    return (f"{m.get('cpu')} ({m.get('cores')} cores, {isa[-1] if isa else 'no ISA flags'}), {m.get('threads')} threads, "
            f"batch {p.batch} x {p.tokens} tokens, {p.repeat} samples, TVM {m.get('tvm')}, PyTorch {m.get('torch')}, "
            f"code {str(m.get('code'))[:8]}")


def model_frame(results) -> pd.DataFrame:
    """One row per whole-model result: plan, achieved sparsity, speedups, metrics, conditions."""
    rows = []
    for r in results:
        d = r.to_dict()
        row = {"plan": d["plan"]["label"], "model": r.plan.model, "sparsity_achieved": r.sparsity_achieved,
               "batch": r.plan.batch, "tokens": r.plan.tokens, "best_dense": d["best_dense"],
               "speedup_vs_best_dense": d["speedup_vs_best_dense"], "speedup_vs_torch_eager": d["speedup_vs_torch_eager"],
               "speedup_vs_tvm_dense": d["speedup_vs_tvm_dense"], "speedup_vs_onnxruntime": d["speedup_vs_onnxruntime"],
               "tvm_sparse_ms": r.times_ms["tvm_sparse"].median, "conditions": model_conditions(r), "dense": False,
               "noisy": bool(r.noisy)}
        row.update(r.metrics)
        rows.append(row)
    return pd.DataFrame(rows)


LENGTH_LINES = {"tvm_sparse": "TVM sparse", "tvm_dense": "TVM dense", "torch_eager": "PyTorch eager",
                "onnxruntime": "ONNX Runtime"}


def length_frame(results, result) -> pd.DataFrame:
    """`result`'s plan at every token count stored: one row per (tokens, implementation) with its median
    ms, from the results measured like it (same pattern, batch, threads, machine and code; one-shot or
    the same recovery), noisy ones left out. Empty columns tokens / implementation / ms when none is stored."""
    def pattern(r):
        m = {k: v for k, v in r.machine.items() if k != "tokens"}
        return (dataclasses.replace(r.plan, tokens=0, repeat=0), json.dumps(m, sort_keys=True, default=str),
                None if r.recovery is None else r.recovery.get("key"))

    mine = pattern(result)
    latest = {r.plan.tokens: r for r in [*results, result] if pattern(r) == mine and not r.noisy}  # one per length

    rows = [{"tokens": tokens, "implementation": label, "ms": r.times_ms[name].median}
            for tokens, r in sorted(latest.items()) for name, label in LENGTH_LINES.items() if name in r.times_ms]
    return pd.DataFrame(rows, columns=["tokens", "implementation", "ms"])


def dense_point(result) -> dict:
    """The unpruned model as a point of the same chart: speedup 1 against every baseline, dense metrics."""
    row = {"plan": "dense (unpruned)", "model": result.plan.model, "sparsity_achieved": 0.0, "dense": True,
           "conditions": model_conditions(result)}
    for peer in ("best_dense", "torch_eager", "tvm_dense", "onnxruntime"):
        row[f"speedup_vs_{peer}"] = 1.0  # against itself: on a speedup axis, dense sits at 1x
    row.update(result.dense_metrics)
    return row


def layer_frame(result) -> pd.DataFrame:
    """The per-layer table of a whole-model result."""
    df = pd.DataFrame(result.layers)
    if "kernel_ms" in df:  # inside the executable's passes; stacked Q, K, V share one kernel's time
        df["kernel_us"] = pd.to_numeric(df.pop("kernel_ms"), errors="coerce") * 1e3
    return df


def recovery_frame(recoveries) -> pd.DataFrame:
    """One row per recovery run (core.results.RecoveryResult): plan, recipe, steps, wall time, and each
    real-label metric before (one-shot), after, and of the dense model."""
    rows = []
    for r in recoveries:
        row = {"plan": r.request.plan.label(), "recipe": r.request.recipe, "steps": r.steps_done,
               "train_batch": r.request.batch, "seq_len": r.request.seq_len, "lengths": r.request.lengths,
               "loss": r.request.loss, "lr": r.request.lr, "seed": r.request.seed, "code": r.machine.get("code"),
               "wall_s": r.wall_s, "sparsity_achieved": r.sparsity_achieved}
        for k in metrics.METRICS:
            row[f"{k}_before"], row[f"{k}_after"] = r.metrics_before.get(k), r.metrics_after.get(k)
            row[f"{k}_dense"] = r.dense_metrics.get(k)
        rows.append(row)
    return pd.DataFrame(rows)


def recipes_side_by_side(df: pd.DataFrame, request, code: str) -> pd.DataFrame:
    """The recipes run like `request` (a RecoveryRequest: same plan, steps, batch, sequence
    length and lengths, loss, learning rate and seed) by the recovery code `code` (recovery.recovery_code()),
    in a `recovery_frame`: one row each, the metrics after recovery, their gain over one-shot, the wall time."""
    if df.empty:
        return df
    same = {"plan": request.plan.label(), "steps": request.steps, "train_batch": request.batch,
            "seq_len": request.seq_len, "lengths": request.lengths, "loss": request.loss, "lr": request.lr,
            "seed": request.seed, "code": code}
    rows = df[np.logical_and.reduce([df[k] == v for k, v in same.items()])]
    out = rows[["recipe", "train_batch", "seq_len", "wall_s"]].copy()
    for k in ("lee_pearson", "polarity_probe_acc", "wordsim_spearman", "simlex_spearman"):
        out[k] = rows[f"{k}_after"]
        out[f"{k} gain"] = rows[f"{k}_after"] - rows[f"{k}_before"]
    return out.sort_values("lee_pearson", ascending=False).reset_index(drop=True)


def recovery_arrows(results) -> pd.DataFrame:
    """The one-shot and recovered points of every recovered plan, for an arrow chart.

    results: whole-model results (ModelResult) under one set of conditions. Each result measured on
    recovered weights is paired with the one-shot result of the same plan; two rows per pair
    (stage "one-shot" then "recovered"), with the pair's id, speedups and metrics. Recovered
    results whose one-shot twin was not measured are left out.
    """
    one_shot = {r.plan: r for r in results if r.recovery is None}
    rows = []
    for r in results:
        if r.recovery is None or r.plan not in one_shot:
            continue
        pair = f"{r.plan.label()} / {r.recovery['recipe']} x {r.recovery['steps']}"
        for stage, res in (("one-shot", one_shot[r.plan]), ("recovered", r)):
            d = res.to_dict()
            rows.append({"pair": pair, "plan": r.plan.label(), "recipe": r.recovery["recipe"],
                         "steps": r.recovery["steps"], "stage": stage, "order": int(stage == "recovered"),
                         **{k: d[k] for k in ("speedup_vs_best_dense", "speedup_vs_torch_eager", "speedup_vs_tvm_dense",
                                              "speedup_vs_onnxruntime")}, **res.metrics})
    return pd.DataFrame(rows)


def sensitivity_frame(result, metric: str = "lee_pearson") -> pd.DataFrame:
    """One row per point of a sensitivity.SensitivityResult: layer, short name (L3 q), sparsity, the
    metric, its loss vs dense, embedding cosine, and the kernel ms (sparse, dense) where timed."""
    rows = []
    for p in result.points:
        layer_no, _, sub = p.layer.removeprefix("encoder.layer.").partition(".")
        rows.append({"layer": p.layer, "short": f"L{layer_no} {_SUBLAYER_SHORT.get(sub, sub)}",
                     "shape": f"{p.shape[0]}x{p.shape[1]}", "sparsity": p.sparsity,
                     "sparsity_achieved": p.sparsity_achieved, metric: p.metrics.get(metric),
                     "loss": result.loss(p, metric), "embedding_cosine": p.metrics.get("embedding_cosine"),
                     "sparse_ms": p.times_ms[SPARSE] if p.times_ms else None,
                     "dense_ms": result.dense_ms(p.layer), "cached": p.cached})
    return pd.DataFrame(rows)


_SUBLAYER_SHORT = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
                   "attention.output.dense": "attn-out", "intermediate.dense": "ffn-in", "output.dense": "ffn-out"}


def allocation_frame(allocation, result) -> pd.DataFrame:
    """One row per layer of an allocation: the chosen sparsity ('dense' if none), its loss and kernel ms."""
    df = sensitivity_frame(result, allocation.metric)
    rows = []
    for layer, s in allocation.choices.items():
        mine = df[df["layer"] == layer]
        if s is None:
            rows.append({"layer": layer, "chosen": "dense", "loss": 0.0, "kernel_ms": mine["dense_ms"].iloc[0]})
        else:
            row = mine[mine["sparsity"] == s].iloc[0]
            rows.append({"layer": layer, "chosen": f"{s:g}", "loss": row["loss"], "kernel_ms": row["sparse_ms"]})
    return pd.DataFrame(rows)
