"""The accuracy commands: `sensitivity` (one layer pruned at a time), `allocate` (per-layer
sparsities for a target), `export` (the pruned model as files)."""
from __future__ import annotations

import argparse
import json
import pathlib

from sparsity_app.accuracy import metrics
from sparsity_app.cli import flags
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import NORMS, parse_block, parse_floats, parse_nm, plan_to_command
from sparsity_app.core.results import SPARSE
from sparsity_app.core.store import Store
from sparsity_app.prune.methods import METHODS
from sparsity_app.runs import resolve
from sparsity_app.runs.model import STEPS as MODEL_STEPS, run_model
from sparsity_app.runs.sensitivity import SensitivityRequest, allocate, ranking, remainder_from_store, run_sensitivity
from sparsity_app.serve.report import open_store, say, steps_to_stderr


def add_parsers(sub) -> None:
    """The subcommands' parsers; their handlers are in COMMANDS."""
    p = sub.add_parser("sensitivity", help="prune one layer at a time: real-label loss and kernel time per layer")
    _add_request_args(p)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    p = sub.add_parser("allocate", help="per-layer sparsities for a target sparsity or latency, from the sensitivity")
    _add_request_args(p)
    p.add_argument("--target-sparsity", type=float, default=None, help="overall fraction of weights removed, e.g. 0.8")
    p.add_argument("--target-latency-ms", type=float, default=None,
                   help="end-to-end ms per pass (kernels + the rest, from a stored whole-model result)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    p = sub.add_parser("export", help="the pruned model as a Hugging Face folder, the compiled sparse library with "
                                      "its loader, and the results, in one directory")
    flags.add_plan_args(p)
    flags.add_recovery_args(p, required=False)
    p.add_argument("--out", required=True, help="a new or empty directory to write into")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory (same names are replaced)")


def _add_request_args(p: argparse.ArgumentParser) -> None:
    d = SensitivityRequest()
    p.add_argument("--model", default=d.model, help="model name (default %(default)s)")
    p.add_argument("--method", default=d.method, type=flags.one_of(METHODS, "pruning method", "methods"),
                   metavar=flags.names(METHODS), help="pruning method (default %(default)s)")
    p.add_argument("--block", default="32x1", help="bs_r x bs_c, e.g. 32x1")
    p.add_argument("--nm", default=None, help="N:M pattern (method nm, random or wanda), e.g. 2:4")
    p.add_argument("--norm", default=d.norm, choices=NORMS)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sparsities", default="0.5,0.7,0.9", help="comma-separated grid (default %(default)s)")
    p.add_argument("--layers", default="", help="comma-separated layer names (default: every prunable linear)")
    p.add_argument("--metric", default="lee_pearson", type=flags.one_of(metrics.METRICS, "metric", "metrics"),
                   metavar=flags.names(metrics.METRICS), help="loss to rank and allocate by")
    flags.add_model_timing_args(p)
    p.add_argument("--no-time", action="store_true", help="metrics only: skip timing each layer's kernel")
    p.add_argument("--cache-dir", default=None, help="result cache (default cache/ or $SPARSITY_APP_CACHE_DIR)")


def _request(args):
    return SensitivityRequest(
        model=args.model, method=args.method, block=parse_block(args.block),
        nm=None if args.nm is None else parse_nm(args.nm), norm=args.norm, seed=args.seed,
        sparsities=tuple(parse_floats(args.sparsities)), layers=tuple(n.strip() for n in args.layers.split(",") if n.strip()),
        tokens=args.tokens, batch=args.batch, threads=args.threads, repeat=args.repeat, time_kernels=not args.no_time)


def _measure(args):
    request = _request(args).resolve()  # every bad input before anything loads
    n = len(request.points())
    say(f"sensitivity of {request.model}, {request.label()}: {len(request.layers)} layers x "
        f"{len(request.sparsities)} sparsities = {n} points (stored points are read back)")
    return run_sensitivity(request, store=Store(args.cache_dir), progress=lambda step, detail: say(f"[{step}] {detail}"))


def _sensitivity(args) -> None:
    result = _measure(args)
    if args.json:
        d = result.to_dict()
        d["ranking"] = ranking(result, args.metric) if result.real_weights else None
        print(json.dumps(d))
    else:
        print(format_sensitivity(result, args.metric))


def format_sensitivity(result, metric: str) -> str:
    """Every point (loss of `metric`, embedding cosine, kernel ms) and the layers ranked, most sensitive first."""
    lines = [f"{result.request.model}: {result.request.label()}, one layer pruned at a time; dense {metric} "
             f"{_f(result.dense_metrics.get(metric))}" + ("  (cached)" if result.cached else ""),
             f"{'layer':40s} {'sparsity':>8s} {metric:>12s} {'loss':>8s} {'emb cos':>8s} {'sparse ms':>10s} "
             f"{'dense ms':>9s}"]
    for p in result.points:
        lines.append(f"{p.layer:40s} {p.sparsity:8.2f} {_f(p.metrics.get(metric), 12)} "
                     f"{_f(result.loss(p, metric), 8)} {_f(p.metrics.get('embedding_cosine'), 8)} "
                     f"{_f(p.times_ms[SPARSE] if p.times_ms else None, 10, 4)} "
                     f"{_f(p.times_ms['tvm_dense'] if p.times_ms else None, 9, 4)}")
    if not result.real_weights:
        return "\n".join(lines + ["(synthetic weights: no accuracy to rank by)"])
    lines += ["", f"ranking by {metric} loss at sparsity {max(result.request.sparsities):g} (most sensitive first)"]
    for row in ranking(result, metric):
        lines.append(f"{row['rank']:3d}. {row['layer']:40s} loss {_f(row['loss_at_max'], 8)}  mean loss "
                     f"{_f(row['mean_loss'], 8)}  saves {_f(row['saved_ms'], 7, 4)} ms")
    return "\n".join(lines)


def _allocate(args) -> None:
    if (args.target_sparsity is None) == (args.target_latency_ms is None):
        raise UserError("give exactly one target: --target-sparsity S or --target-latency-ms MS")
    if args.target_latency_ms is not None and args.no_time:
        raise UserError("--target-latency-ms needs timed kernels: drop --no-time")
    result = _measure(args)
    remainder = None
    if args.target_latency_ms is not None:
        remainder = remainder_from_store(result.request, Store(args.cache_dir))
    a = allocate(result, target_sparsity=args.target_sparsity, target_latency_ms=args.target_latency_ms,
                 metric=args.metric, remainder_ms=remainder)
    if args.json:
        print(json.dumps({**a.to_dict(), "sensitivity_cached": result.cached}))
        return
    target = f"sparsity {a.value:g}" if a.target == "sparsity" else f"latency {a.value:g} ms"
    lines = [f"allocation for {target} by {a.metric}: achieved sparsity {a.sparsity:.3f}, predicted {a.metric} loss "
             f"{a.predicted_loss:.4f}" + ("" if a.predicted_ms is None else f", predicted {a.predicted_ms:.3f} ms")]
    for layer, s in a.choices.items():
        lines.append(f"  {layer:40s} {'dense' if s is None else f'{s:g}'}")
    lines += ["overrides:", *(f"  {o}" for o in a.plan.overrides), f"note: {a.note}", "run it with:",
              f"  {plan_to_command(a.plan)}"]
    print("\n".join(lines))


def _export(args) -> None:
    # lazy: exporting compiles a library (TVM); the other commands start without it
    from sparsity_app.serve import export

    plan = flags.plan(args)
    resolved = resolve.plan(plan)  # every bad input before anything loads
    export.check_out_dir(pathlib.Path(args.out), args.force)  # before minutes of training and measuring
    store, weights, result, what = open_store(args.cache_dir), None, None, plan.label()
    if args.recipe is not None:  # the recovered weights, and the whole model measured on them
        recovered = flags.recovered(flags.recovery_request(args, plan, resolved), store, args.time_limit)
        weights = store.recovered_weights(recovered.key)[0]
        result = run_model(resolved, store=store, progress=steps_to_stderr(MODEL_STEPS), recovery=recovered)
        what += f" recovered by {recovered.request.recipe} ({recovered.steps_done} steps)"
    out = export.export_model(resolved, args.out, weights=weights, store=store, progress=steps_to_stderr(export.STEPS),
                              force=args.force, result=result)
    print(f"exported {what} to {out}: hf/ (AutoModel.from_pretrained), sparse_model.so + run_sparse_model.py "
          f"(TVM + NumPy), result.json, layers.csv")


def _f(v, width: int = 0, digits: int = 3) -> str:
    return ("-" if v is None else f"{v:.{digits}f}").rjust(width)


COMMANDS = {"sensitivity": _sensitivity, "allocate": _allocate, "export": _export}
