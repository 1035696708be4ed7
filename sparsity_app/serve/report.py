"""Results as a terminal reads them: tables, the whole-model and recovery summaries, and CSV.

Used by the CLI's commands and the benchmarks alike (both print results); nothing here computes.
"""
from __future__ import annotations

import csv
import sys

from sparsity_app.core.errors import UserError
from sparsity_app.core.results import REMEASURE
from sparsity_app.core.store import Store

TABLE_COLUMNS = (("pattern", "pattern", "{}"), ("format", "format", "{}"), ("sparsity_achieved", "sparsity", "{:.3f}"),
                 ("tvm_sparse_ms", "sparse ms", "{:.4f}"), ("best_dense_ms", "best dense ms", "{:.4f}"),
                 ("best_dense", "best dense", "{}"), ("speedup_vs_best_dense", "vs best", "{:.2f}x"),
                 ("speedup_vs_tvm_dense", "vs tvm", "{:.2f}x"), ("speedup_vs_torch_dense", "vs torch", "{:.2f}x"),
                 ("ideal_speedup", "ideal", "{:.2f}x"), ("output_cosine", "out cos", "{:.3f}"),
                 ("lee_pearson", "lee r", "{:.3f}"), ("tune_s", "tune s", "{:.2f}"), ("compile_s", "compile s", "{:.2f}"),
                 ("cached", "cached", "{}"))


def rows_text(rows: list[dict]) -> str:
    """Rows of one shape as a plain text table (pandas' layout)."""
    import pandas as pd  # lazy: pandas takes ~0.5 s to import, and only the benchmarks' tables need it

    return pd.DataFrame(rows).to_string(index=False)


def format_table(rows: list[dict]) -> str:
    head = [title for _, title, _ in TABLE_COLUMNS]
    body = [[("-" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in TABLE_COLUMNS] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head, *body]]
    note = "" if all(r.get("lee_pearson") is not None for r in rows) else \
        "\n(synthetic weights: accuracy columns mean nothing)" if any(r["model"].endswith("synthetic") for r in rows) else ""
    noisy = sum(bool(r.get("noisy")) for r in rows)
    if noisy:
        note += f"\n({noisy} row{'s' if noisy > 1 else ''} measured on a busy machine: NOISY, not figures)"
    return "\n".join(lines) + note


def format_same_pattern(result) -> str:
    """A reconstructing method's layer run: what its update buys (Result.same_pattern), one line per way of
    pruning the same pattern to the same density; "" for any other result."""
    if not result.same_pattern:
        return ""
    width = max(len(name) for name in result.same_pattern)
    return "\n".join([f"what the reconstruction buys (layer output on {result.scored_tokens} calibration tokens):",
                      *(f"  {name:{width}s}  cosine {s['output_cosine']:.3f}  relative error {s['output_rel_error']:.3f}"
                        for name, s in result.same_pattern.items())])


def write_csv(rows: list[dict], path: str) -> None:
    try:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def format_model(d: dict) -> str:
    """A whole-model result as text: times, speedups, breakdown, metrics beside the dense model's."""
    t = d["times_ms"]
    lines = [f"{d['plan']['model']}: {d['plan']['label']}, batch {d['plan']['batch']} x {d['plan']['tokens']} tokens, "
             f"{d['plan']['threads']} threads; achieved sparsity {d['sparsity_achieved']:.3f}; max relative error vs "
             f"masked PyTorch {d['max_abs_error']:.1e}" + ("  (cached)" if d["cached"] else "")]
    for name, timing in t.items():
        ratio = "" if name == "tvm_sparse" else f"   sparse is {timing['median'] / t['tvm_sparse']['median']:.2f}x faster"
        lines.append(f"  {name:20s} {timing['median']:9.3f} ms  (spread {timing['spread']:.3f}){ratio}")
    if d.get("noisy"):
        lines.append(f"  NOISY, not a figure (the machine was busy; measured {1 + REMEASURE} times): {d['noisy']}")
    lines.append(f"  best dense: {d['best_dense']}; speedup vs best dense {d['speedup_vs_best_dense']:.2f}x; "
                 f"Amdahl bound (linears free) {d['amdahl_bound']:.2f}x over TVM dense")
    for name, groups in d["breakdown"].items():
        lines.append(f"  {name} breakdown (ms): " + ", ".join(f"{g} {v:.3f}" for g, v in groups.items()))
    if d["real_weights"]:
        lines.append("  metric              pruned   dense")
        for k, v in d["metrics"].items():
            lines.append(f"  {k:18s} {v:7.3f} {d['dense_metrics'][k]:7.3f}")
    else:
        lines.append(f"  ({d['accuracy_note']})")
    return "\n".join(lines)


def format_recovery(d: dict) -> str:
    """A recovery run as text: the metrics before and after it beside the dense model's."""
    lines = [f"{d['plan']['model']}: {d['plan']['label']}, recipe {d['recipe']}, {d['steps']} steps in {d['wall_s']:.0f} s"
             f" (scoring {d['eval_s']:.0f} s); achieved sparsity {d['sparsity_achieved']:.3f}"
             + (f"; resumed from step {d['resumed_from']}" if d["resumed_from"] else "") + ("  (cached)" if d["cached"] else ""),
             "  metric                  one-shot  recovered  dense"]
    for k, before in d["metrics_before"].items():
        lines.append(f"  {k:22s} {before:9.3f} {d['metrics_after'][k]:10.3f} {d['dense_metrics'][k]:6.3f}")
    if d["loss"]:
        lines.append("  distillation loss: " + ", ".join(f"{loss:.4g} @ {step}" for step, loss in
                                                         d["loss"][:: max(1, len(d["loss"]) // 6)]))
    return "\n".join(lines)


def open_store(directory: str | None):
    """The result store, after saying on stderr what was wrong with it (e.g. an unreadable index kept aside)."""
    store = Store(directory)
    for note in store.notes:
        say(f"warning: {note}")
    return store


def steps_to_stderr(steps: tuple[str, ...], indent: str = ""):
    """A progress callback printing '[3/7 compile] detail' on stderr (other messages, e.g. queue, as they come)."""
    def show(step: str, detail: str) -> None:
        where = f"{steps.index(step) + 1}/{len(steps)} {step}" if step in steps else step
        say(f"{indent}[{where}] {detail}")
    return show


def mean_sd(values) -> tuple[float, float]:
    """(mean, sd) of a protocol's figures (one per seed or draw); sd is the population one (0 for one
    value), in every table that prints a mean over seeds."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def say(line: str) -> None:
    """One line on stderr, at once (what a command tells while it works; stdout is its result)."""
    print(line, file=sys.stderr, flush=True)
