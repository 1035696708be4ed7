"""Chart builders: pure functions, DataFrame (see analysis.frame) in, `alt.Chart` out."""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from sparsity_app.accuracy.metrics import METRICS
from sparsity_app.accuracy.proxies import PROXIES
from sparsity_app.serve.analysis import pareto_mask

TOOLTIP = ["pattern", "format", "sparsity_target", alt.Tooltip("sparsity_achieved", format=".3f"),
           alt.Tooltip("tvm_sparse_ms", format=".4f"), alt.Tooltip("best_dense_ms", format=".4f"), "best_dense",
           alt.Tooltip("speedup_vs_best_dense", format=".2f"), alt.Tooltip("speedup_vs_torch_dense", format=".2f"),
           alt.Tooltip("speedup_vs_tvm_dense", format=".2f"), alt.Tooltip("output_cosine", format=".3f"),
           alt.Tooltip("lee_pearson", format=".3f"), "tokens", "threads", "seed"]


def tradeoff(df: pd.DataFrame, proxy: str = "output_cosine", speedup: str = "speedup_vs_best_dense",
             current: dict | None = None) -> alt.Chart:
    """Accuracy proxy against speedup, one point per result, coloured by pattern; the Pareto front
    (best proxy for a given speedup) as a line; `current` (a row) ringed."""
    label, higher = PROXIES[proxy].label, PROXIES[proxy].higher_is_better
    data = df.dropna(subset=[proxy]).copy()
    data["_y"] = data[proxy] if higher else -data[proxy]
    sound = ~data["noisy"].fillna(False).astype(bool) if "noisy" in data else pd.Series(True, index=data.index)
    data["pareto"] = False  # the front is drawn through sound points only: noise is never a lesson
    if sound.any():
        data.loc[sound, "pareto"] = pareto_mask(data.loc[sound, speedup].to_numpy(), data.loc[sound, "_y"].to_numpy())
    base = alt.Chart(data).encode(
        x=alt.X(f"{speedup}:Q", title=speedup.replace("_", " ") + " (x)", scale=alt.Scale(zero=False)),
        y=alt.Y(f"{proxy}:Q", title=label, scale=alt.Scale(zero=False)))
    points = base.mark_circle(size=80, opacity=0.8).encode(color=alt.Color("pattern:N", title="pattern"),
                                                           tooltip=TOOLTIP)
    front = base.transform_filter("datum.pareto").mark_line(color="gray", strokeDash=[4, 3]).encode(
        order=f"{speedup}:Q")
    layers = [front, points]
    if current is not None:
        ring = pd.DataFrame([{speedup: current[speedup], proxy: current.get(proxy)}]).dropna()
        layers.append(alt.Chart(ring).mark_point(size=400, color="black", strokeWidth=2, shape="circle")
                      .encode(x=f"{speedup}:Q", y=f"{proxy}:Q"))
    return alt.layer(*layers).properties(title=f"{label} vs speedup (dashed: Pareto front)", height=380)


def speedup_vs_sparsity(df: pd.DataFrame, speedup: str = "speedup_vs_best_dense") -> alt.Chart:
    """Measured speedup per pattern against sparsity, with the ideal 1/(1-s) and break-even (1x)."""
    s = np.linspace(0, max(0.96, float(df["sparsity_achieved"].max())), 60)
    ideal = alt.Chart(pd.DataFrame({"sparsity_achieved": s, "ideal": 1 / (1 - s)})).mark_line(
        color="black", strokeDash=[6, 3]).encode(x="sparsity_achieved:Q", y="ideal:Q")
    even = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(color="red").encode(y="y:Q")
    lines = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("sparsity_achieved:Q", title="sparsity"),
        y=alt.Y(f"{speedup}:Q", title=speedup.replace("_", " ") + " (x)", scale=alt.Scale(type="log")),
        color="pattern:N", tooltip=TOOLTIP)
    return alt.layer(ideal, even, lines).properties(
        title="speedup vs sparsity (dashed: ideal 1/(1-s); red: break-even)", height=340)


def devices(df: pd.DataFrame, speedup: str = "speedup_vs_tvm_dense") -> alt.Chart:
    """The same configurations on several devices (analysis.device_frame): speedup against
    sparsity, one colour per device, one line per (device, pattern), the pattern as the point's
    shape. Each speedup compares kernels timed on its own device; the default, TVM dense, is the
    one peer every device has."""
    even = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(color="red").encode(y="y:Q")
    lines = alt.Chart(df.dropna(subset=[speedup])).mark_line(point=True).encode(
        x=alt.X("sparsity_achieved:Q", title="sparsity"),
        y=alt.Y(f"{speedup}:Q", title=speedup.replace("_", " ") + " (x, on its own device)",
                scale=alt.Scale(type="log")),
        color=alt.Color("device:N", title="device"), shape=alt.Shape("pattern:N", title="pattern"),
        detail="pattern:N", tooltip=["device", "pattern", "sparsity_target", alt.Tooltip("sparsity_achieved", format=".3f"),
                                     alt.Tooltip(speedup, format=".2f"), alt.Tooltip("tvm_sparse_ms", format=".4f"),
                                     alt.Tooltip("tvm_dense_ms", format=".4f"), "tokens", "threads"])
    return alt.layer(even, lines).properties(title="the same configurations on each device (red: break-even)",
                                             height=340)


def speedup_heatmap(df: pd.DataFrame, speedup: str = "speedup_vs_best_dense") -> alt.Chart:
    base = alt.Chart(df).encode(x=alt.X("sparsity_target:O", title="sparsity"), y=alt.Y("pattern:N", title="pattern"))
    cells = base.mark_rect().encode(color=alt.Color(f"{speedup}:Q", scale=alt.Scale(scheme="redyellowgreen",
                                                                                    domainMid=1)),
                                    tooltip=TOOLTIP)
    text = base.mark_text(baseline="middle").encode(text=alt.Text(f"{speedup}:Q", format=".1f"))
    return (cells + text).properties(title=f"{speedup.replace('_', ' ')} (x)", height=220)


def proxy_vs_sparsity(df: pd.DataFrame, proxy: str = "output_cosine") -> alt.Chart:
    label = PROXIES[proxy].label
    return alt.Chart(df.dropna(subset=[proxy])).mark_line(point=True).encode(
        x=alt.X("sparsity_achieved:Q", title="sparsity"), y=alt.Y(f"{proxy}:Q", title=label, scale=alt.Scale(zero=False)),
        color="pattern:N", tooltip=TOOLTIP).properties(title=f"{label} vs sparsity", height=340)


def mask_heatmap(mask: np.ndarray, max_cells: int = 96) -> tuple[alt.Chart, int]:
    """Kept fraction of the mask on a grid of at most max_cells per side; returns (chart, factor).

    factor > 1 means each cell averages factor x factor weights (the caption must say so).
    """
    out_f, in_f = mask.shape
    factor = max(1, int(np.ceil(max(out_f, in_f) / max_cells)))
    r, c = out_f // factor, in_f // factor
    grid = mask[: r * factor, : c * factor].reshape(r, factor, c, factor).mean(axis=(1, 3))
    rows, cols = np.indices(grid.shape)
    data = pd.DataFrame({"out": rows.ravel() * factor, "in": cols.ravel() * factor, "kept": grid.ravel()})
    chart = alt.Chart(data).mark_rect().encode(
        x=alt.X("in:O", title="input feature", axis=alt.Axis(labels=False, ticks=False)),
        y=alt.Y("out:O", title="output feature", axis=alt.Axis(labels=False, ticks=False)),
        color=alt.Color("kept:Q", title="kept", scale=alt.Scale(scheme="greys", domain=[0, 1])),
        tooltip=["out", "in", alt.Tooltip("kept", format=".2f")],
    ).properties(width=min(420, 4 * c + 40), height=min(420, 4 * r + 40))
    return chart, factor


PAPER_SPEEDUPS = {"speedup_vs_torch_eager": (4.0, "paper: 4x vs PyTorch"), "speedup_vs_tvm_dense": (2.2, "paper: 2.2x vs TVM")}


def model_tradeoff(df: pd.DataFrame, metric: str, speedup: str = "speedup_vs_best_dense") -> alt.Chart:
    """A real-label metric against end-to-end speedup, one point per cached plan, the dense model as
    a black square, and the paper's headline speedup as a rule where it applies to this axis."""
    data = df.dropna(subset=[metric, speedup])
    base = alt.Chart(data).encode(
        x=alt.X(f"{speedup}:Q", title=speedup.replace("_", " ") + " (x, end to end)", scale=alt.Scale(zero=False)),
        y=alt.Y(f"{metric}:Q", title=METRICS[metric].label, scale=alt.Scale(zero=False)),
        tooltip=["plan", alt.Tooltip("sparsity_achieved", format=".3f"), alt.Tooltip(speedup, format=".2f"),
                 alt.Tooltip(metric, format=".3f"), "batch", "tokens"])
    points = base.transform_filter("!datum.dense").mark_circle(size=90).encode(color=alt.Color("plan:N", title="plan"))
    dense = base.transform_filter("datum.dense").mark_square(size=120, color="black")
    layers = [points, dense]
    if speedup in PAPER_SPEEDUPS:
        value, text = PAPER_SPEEDUPS[speedup]
        rule = pd.DataFrame({speedup: [value], "text": [text]})
        layers.append(alt.Chart(rule).mark_rule(color="red", strokeDash=[5, 3]).encode(x=f"{speedup}:Q"))
        layers.append(alt.Chart(rule).mark_text(align="left", dx=4, dy=-150, color="red").encode(
            x=f"{speedup}:Q", text="text:N"))
    return alt.layer(*layers).properties(title=f"{METRICS[metric].label} vs end-to-end speedup (black: dense)",
                                         height=380)


def breakdown_bars(breakdown: dict[str, dict[str, float]]) -> alt.Chart:
    """Where the time of one forward pass goes: a stacked bar per executable, one colour per operator group."""
    rows = [{"executable": name.replace("_", " "), "group": g, "ms": ms}
            for name, groups in breakdown.items() for g, ms in groups.items()]
    return alt.Chart(pd.DataFrame(rows)).mark_bar().encode(
        y=alt.Y("executable:N", title=None), x=alt.X("ms:Q", title="ms per forward pass", stack="zero"),
        color=alt.Color("group:N", title="operators"), tooltip=["executable", "group", alt.Tooltip("ms", format=".3f")],
    ).properties(title="where the time goes (each kernel timed inside real passes)", height=200)


def time_per_length(df: pd.DataFrame) -> alt.Chart:
    """ms per forward pass against tokens, one line per implementation (analysis.length_frame)."""
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("tokens:Q", title="tokens per sequence"), y=alt.Y("ms:Q", title="ms per forward pass"),
        color=alt.Color("implementation:N", title=None),
        tooltip=["implementation", "tokens", alt.Tooltip("ms", format=".2f")],
    ).properties(title="time per length: this plan at every token count measured", height=260)


def recovery_arrows(df: pd.DataFrame, metric: str, speedup: str = "speedup_vs_best_dense") -> alt.Chart:
    """One arrow per recovered plan (analysis.recovery_arrows): from its one-shot point (hollow) to its
    recovered point (triangle), a real-label metric against end-to-end speedup, one colour per recipe."""
    data = df.dropna(subset=[metric, speedup])
    base = alt.Chart(data).encode(
        x=alt.X(f"{speedup}:Q", title=speedup.replace("_", " ") + " (x, end to end)", scale=alt.Scale(zero=False)),
        y=alt.Y(f"{metric}:Q", title=METRICS[metric].label, scale=alt.Scale(zero=False)),
        color=alt.Color("recipe:N", title="recipe"),
        tooltip=["plan", "recipe", "steps", "stage", alt.Tooltip(speedup, format=".2f"), alt.Tooltip(metric, format=".3f")])
    lines = base.mark_line(strokeWidth=2).encode(detail="pair:N", order="order:Q")
    start = base.transform_filter("datum.stage == 'one-shot'").mark_point(size=90, filled=False, color="gray")
    end = base.transform_filter("datum.stage == 'recovered'").mark_point(shape="triangle-up", size=140, filled=True)
    return alt.layer(lines, start, end).properties(
        title=f"{METRICS[metric].label}: one-shot (hollow) -> recovered (triangle), vs end-to-end speedup", height=380)


def sensitivity_heatmap(df: pd.DataFrame, metric: str = "lee_pearson") -> alt.Chart:
    """Layer x sparsity, colour = loss of `metric` when only that layer is pruned (analysis.sensitivity_frame)."""
    order = list(dict.fromkeys(df["short"]))
    base = alt.Chart(df).encode(x=alt.X("sparsity:O", title="sparsity of the one pruned layer"),
                                y=alt.Y("short:N", title="layer", sort=order))
    cells = base.mark_rect().encode(
        color=alt.Color("loss:Q", title=f"{metric} loss", scale=alt.Scale(scheme="orangered", domainMin=0)),
        tooltip=["layer", "shape", "sparsity", alt.Tooltip("sparsity_achieved", format=".3f"),
                 alt.Tooltip(metric, format=".4f"), alt.Tooltip("loss", format=".4f"),
                 alt.Tooltip("embedding_cosine", format=".4f"), alt.Tooltip("sparse_ms", format=".4f"),
                 alt.Tooltip("dense_ms", format=".4f")])
    text = base.mark_text(baseline="middle", fontSize=10).encode(text=alt.Text("loss:Q", format=".3f"))
    return (cells + text).properties(title=f"{metric} lost by pruning one layer alone (dense minus pruned)",
                                     height=max(160, 16 * len(order)))
