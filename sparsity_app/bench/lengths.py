"""python -m sparsity_app bench-model --lengths 8..128: the whole model's time at every sentence length.

Real sentences are not 32 or 128 tokens long. For each length this compiles the sparse and the
dense encoders (the tuned schedules are shared by the lengths of one token bucket, see
measure.tuner.token_bucket), checks both against PyTorch, and times them with PyTorch eager and
ONNX Runtime; the lengths up to each multiple of 8 are timed together in one `measure` call.
The verdict is the issue's: time never jumps at an awkward length (each length within 1.15x of the
next multiple of 8), and no "vs TVM dense" ratio is inflated by a slow dense peer (none above
1.5x the longest length's ratio).
A command, never a test: it prints figures of this machine.
"""
from __future__ import annotations

import re

from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ResolvedPlan, default_threads
from sparsity_app.core.results import SPARSE
from sparsity_app.core.store import Store
from sparsity_app.measure.backend import LocalDevice
from sparsity_app.measure.locks import measurement_slot
from sparsity_app.measure.timing import measure
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import plan_masks
from sparsity_app.serve.report import say

IMPLEMENTATIONS = {SPARSE: "TVM sparse", "tvm_dense": "TVM dense", "torch_eager": "PyTorch eager",
                   "onnxruntime": "ONNX Runtime"}
STEADY = 1.15  # each length's time within this factor of the next multiple of 8's
INFLATION = 1.5  # no "vs TVM dense" above this factor of the longest length's


def parse_lengths(text: str) -> list[int]:
    """'8..128' (every length), '8..128:8' (a step), or '24,27,31' -> sorted lengths, each >= 1."""
    lengths: set[int] = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d{1,5})\s*(?:\.\.\s*(\d{1,5})\s*(?::\s*(\d{1,5})\s*)?)?", part)
        if not m or int(m[1]) < 1 or (m[2] and int(m[2]) < int(m[1])) or (m[3] and int(m[3]) < 1):
            raise UserError(f"--lengths must look like 8..128, 8..128:8 or 24,27,31 (tokens >= 1), got {part.strip()!r}")
        lengths.update(range(int(m[1]), int(m[2] or m[1]) + 1, int(m[3] or 1)))
    return sorted(lengths)


def time_lengths(plans: list[ResolvedPlan], store: Store | None) -> list[dict]:
    """One row per plan (the same pattern at different lengths): {"tokens", "batch", "times_ms": {name: Timing}}.

    The weights are pruned once. Lengths are timed in groups that end at a multiple of 8 (25..32,
    33..40, ...): a group's executables are all compiled, checked against PyTorch (relative error
    <= 1e-4), then timed in one `measure` call, so a length and its multiple of 8 are compared under
    the same machine state (the host drifts between calls minutes apart).
    """
    first = plans[0]
    model, specs = get_model(first.plan.model), first.specs
    threads = first.plan.threads or default_threads()
    weights = {name: model.weight(name) for name in specs}  # name -> (W float32 [out, in], bias)
    masks = plan_masks(first.plan.model, specs)
    pruned = {name: weights[name][0] * masks[name] for name in specs}
    biases = {name: weights[name][1] for name in specs}
    reference = model.pruned_copy(pruned)
    groups: dict[int, list[ResolvedPlan]] = {}
    for resolved in plans:
        groups.setdefault(-(-resolved.plan.tokens // 8) * 8, []).append(resolved)
    rows = []
    for group in groups.values():
        tokens = [resolved.plan.tokens for resolved in group]
        say(f"  {tokens[0]}..{tokens[-1]} tokens: tune (once per token bucket), compile, verify, then time in one call")
        with measurement_slot(f"bench-model lengths {tokens[0]}..{tokens[-1]}"):  # tuning measures too
            fns = {}
            for resolved in group:
                fns.update({f"{name}@{resolved.plan.tokens}": fn for name, fn in
                            _implementations(resolved.plan, model, specs, pruned, masks, biases, threads, store,
                                             reference).items()})
            LocalDevice().set_threads(threads)
            times = measure(fns, repeat=first.plan.repeat, per_round=3, settle_s=0.2)
        rows += [{"tokens": t, "batch": first.plan.batch, "times_ms": {name: times[f"{name}@{t}"] for name in IMPLEMENTATIONS}}
                 for t in tokens]
    return rows


def _implementations(plan, model, specs, pruned, masks, biases, threads, store, reference) -> dict:
    """IMPLEMENTATIONS' callables at the plan's length, the TVM executables checked against PyTorch."""
    # lazy: the graph and the peers load TVM, PyTorch and ONNX Runtime; the CLI's parser needs none of them
    from sparsity_app.model import baselines, graph

    LocalDevice().set_threads(threads)
    hf, tokenizer = model.torch_model(), model.tokenizer()
    linears = graph.plan_linears(plan.model, specs, pruned, masks, biases, plan.batch * plan.tokens, threads, store,
                                 False)
    sparse = graph.compile_encoder(hf, hf, {n: linear for n, (linear, _) in linears.items()}, plan.batch, plan.tokens)
    dense = graph.compile_encoder(hf, hf, {}, plan.batch, plan.tokens)
    ids, attention = baselines.example_inputs(tokenizer, plan.batch, plan.tokens)
    graph.verify(sparse, reference, ids, attention)
    graph.verify(dense, hf, ids, attention)
    sparse.set_inputs(ids, attention)
    dense.set_inputs(ids, attention)
    return {SPARSE: sparse.run, "tvm_dense": dense.run,
            "torch_eager": baselines.torch_eager(hf, plan.batch, plan.tokens, tokenizer),
            "onnxruntime": baselines.onnxruntime_session(hf, plan.batch, plan.tokens, threads, tokenizer)}


def format_lengths(rows: list[dict]) -> str:
    """The table: one line per length, each implementation's median ms (and spread, the IQR), and the
    sparse speedup over TVM dense."""
    head = f"{'tokens':>6}  " + "  ".join(f"{label + ' ms':>19}" for label in IMPLEMENTATIONS.values()) + "  vs TVM dense"
    lines = [head]
    for row in rows:
        t = row["times_ms"]
        cells = "  ".join(f"{t[name].median:10.3f} ±{t[name].spread:6.3f}" for name in IMPLEMENTATIONS)
        lines.append(f"{row['tokens']:>6}  {cells}  {t['tvm_dense'].median / t[SPARSE].median:11.2f}x")
    return "\n".join(lines)


def length_targets(rows: list[dict]) -> str:
    """The verdicts on this run's rows: steady time per length, and no inflated ratio."""
    by_tokens = {row["tokens"]: row["times_ms"] for row in rows}
    out = ["", "== targets (one run; each group of lengths up to a multiple of 8 in one measure call)"]
    for name in (SPARSE, "tvm_dense"):
        worst = None
        for tokens, times in by_tokens.items():
            rounded = -(-tokens // 8) * 8
            if rounded != tokens and rounded in by_tokens:
                ratio = times[name].median / by_tokens[rounded][name].median
                if worst is None or ratio > worst[0]:
                    worst = (ratio, tokens, rounded)
        if worst is None:
            out.append(f"{IMPLEMENTATIONS[name]}: no length with its next multiple of 8 in this run: not judged")
        else:
            ratio, tokens, rounded = worst
            out.append(f"{IMPLEMENTATIONS[name]}: worst length {tokens} at {ratio:.2f}x the time of {rounded} "
                       f"(<= {STEADY}) {'ok' if ratio <= STEADY else 'MISSED'}")
    longest = max(by_tokens)
    base = by_tokens[longest]["tvm_dense"].median / by_tokens[longest][SPARSE].median
    tokens, ratio = max(((t, v["tvm_dense"].median / v[SPARSE].median) for t, v in by_tokens.items()),
                        key=lambda item: item[1])
    out.append(f"vs TVM dense: highest {ratio:.2f}x at {tokens} tokens, {ratio / base:.2f}x the {longest}-token "
               f"{base:.2f}x (<= {INFLATION}) {'ok' if ratio <= INFLATION * base else 'MISSED'}")
    return "\n".join(out)
