"""python -m sparsity_app {layers, run, sweep, model, recover, bench-model, bench, cache}: a thin door onto the engine.

Bad input gets one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

from .cli_accuracy import COMMANDS as ACCURACY_COMMANDS, add_parsers as add_accuracy_parsers
from .errors import UserError
from .spec import BLOCK_PRESETS, NORMS, ModelPlan, Spec, parse_block, parse_nm


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise UserError(f"{message} (see `python -m sparsity_app {self.prog.split()[-1]} --help`)")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers like 0.5,0.9, got {text!r}") from None


def _seed(text: str) -> int:
    """A training seed: NumPy seeds the data order with it, so a non-negative integer."""
    if not text.strip().isdecimal():  # no sign, no fraction
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def _seeds(text: str) -> tuple[int, ...]:
    """Two or more distinct training seeds, comma-separated (e.g. 0,1,2)."""
    seeds = tuple(_seed(t) for t in text.split(","))
    if len(seeds) < 2 or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"takes two or more distinct comma-separated seeds (e.g. 0,1,2), got {text!r}")
    return seeds


def _add_spec_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    d = Spec()
    p.add_argument("--model", default=d.model, help="model name (default %(default)s)")
    p.add_argument("--layer", default=d.layer, help="dotted layer name (see `layers`)")
    p.add_argument("--method", default=d.method, help="magnitude | block | nm | random | wanda (default %(default)s)")
    if not sweep:
        p.add_argument("--block", default="32x1", help=f"bs_r x bs_c, e.g. {', '.join(BLOCK_PRESETS)}")
        p.add_argument("--sparsity", type=float, default=d.sparsity, help="fraction removed, 0..0.99")
        p.add_argument("--nm", default=None, help="N:M pattern for --method nm (or random), e.g. 2:4")
    p.add_argument("--norm", default=d.norm, choices=NORMS, help="block score norm (default %(default)s)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="rows of X (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of random pruning")
    p.add_argument("--threads", type=int, default=0, help="threads for every kernel (0 = all cores)")
    p.add_argument("--repeat", type=int, default=d.repeat, help="timed samples per implementation (default %(default)s)")
    p.add_argument("--retune", action="store_true", help="measure again and re-tune the schedule, "
                   "replacing what is stored")
    p.add_argument("--cache-dir", default=None, help="result cache (default cache/ or $SPARSITY_APP_CACHE_DIR)")
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                   help="measure on the servers of a TVM RPC tracker instead of this machine (needs --rpc-key)")
    p.add_argument("--rpc-key", default=None, help="device key the RPC servers registered with (rpc_server --key)")
    p.add_argument("--rpc-target", default="", metavar="mtriple=...,mcpu=...",
                   help="LLVM target of the RPC device (default: the triple and CPU the device reports)")


def _backend(args: argparse.Namespace):
    """Where to measure: this machine, or the RPC tracker's servers of --rpc-key."""
    from .backend import LOCAL, Backend

    if args.rpc_tracker is None and args.rpc_key is None:
        if args.rpc_target:
            raise UserError("--rpc-target needs --rpc-tracker and --rpc-key")
        return LOCAL
    if args.rpc_tracker is None or args.rpc_key is None:
        raise UserError("measuring on an RPC device needs both --rpc-tracker HOST:PORT and --rpc-key KEY")
    return Backend(kind="rpc", tracker=args.rpc_tracker, key=args.rpc_key, target=args.rpc_target).resolve()


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    d = ModelPlan()
    p.add_argument("--model", default=d.model, help="model name (default %(default)s)")
    p.add_argument("--method", default=d.method, help="magnitude | block | nm | random | wanda (default %(default)s)")
    p.add_argument("--block", default="32x1", help="bs_r x bs_c of every layer, e.g. 32x1")
    p.add_argument("--sparsity", type=float, default=d.sparsity, help="fraction removed from each layer")
    p.add_argument("--nm", default=None, help="N:M pattern of every layer (method nm or random), e.g. 2:4")
    p.add_argument("--norm", default=d.norm, choices=NORMS)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--override", action="append", default=[], metavar="TARGET=VALUE",
                   help="per-layer pattern, repeatable: TARGET a role (q, k, v, qkv, attention-output, ffn-in, "
                        "ffn-out) or a layer-name glob; VALUE a sparsity, 'dense', BxC@sparsity or N:M")
    p.add_argument("--tokens", type=int, default=d.tokens, help="sequence length (default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per call (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="threads for every implementation (0 = all cores)")
    p.add_argument("--repeat", type=int, default=d.repeat, help="timed samples per implementation")
    p.add_argument("--retune", action="store_true", help="measure again and re-tune every layer's schedule")
    p.add_argument("--cache-dir", default=None, help="result cache (default cache/ or $SPARSITY_APP_CACHE_DIR)")


def _add_recovery_args(p: argparse.ArgumentParser, required: bool) -> None:
    from .recovery import LENGTHS, RECIPES, RecoveryRequest

    d = RecoveryRequest()
    g = p.add_argument_group("recovery fine-tune" + ("" if required else " (with --recipe: measure the recovered "
                                                                          "weights instead of the one-shot ones)"))
    g.add_argument("--recipe", default="fixed" if required else None,
                   help=f"{' | '.join(RECIPES)}" + (" (default %(default)s)" if required else ""))
    g.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (default %(default)s)")
    g.add_argument("--train-batch", type=int, default=d.batch, help="sequences of --seq-len tokens per step: the "
                   "step's tokens, however --lengths cuts them (default %(default)s)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="a step reads --train-batch x --seq-len tokens "
                   "(default %(default)s)")
    g.add_argument("--lengths", default=d.lengths, help=f"{' | '.join(LENGTHS)}: sequences of --seq-len tokens only "
                   "(fixed), or steps cycling through seq-len/8, /4, /2 and seq-len tokens, as many sequences as make "
                   "the same tokens (mixed; default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default %(default)s)")
    g.add_argument("--train-seed", type=_seed, default=d.seed, help="seed of the training data order")
    g.add_argument("--loss", default=d.loss, help="what the student reproduces: hidden (every layer's hidden states, "
                   "MSE) | pooled (the sentence embedding, cosine) | hidden+pooled (default %(default)s)")
    g.add_argument("--beta-schedule", default=d.beta_schedule, help="mask-decay: linear | exponential")
    g.add_argument("--decay-fraction", type=float, default=d.decay_fraction,
                   help="gradual/mask-decay/structure-decay/group-lasso: share of the steps before the final mask")
    g.add_argument("--group-lasso", type=float, default=d.group_lasso, help="group-lasso: penalty weight")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop training after this long, keeping a checkpoint that the next run resumes from")


def _recovery_request(args: argparse.Namespace, plan: ModelPlan):
    from .recovery import RecoveryRequest

    return RecoveryRequest(plan=plan, recipe=args.recipe, steps=args.steps, batch=args.train_batch, seq_len=args.seq_len,
                           lr=args.lr, seed=args.train_seed, beta_schedule=args.beta_schedule, loss=args.loss,
                           lengths=args.lengths,
                           decay_fraction=args.decay_fraction, group_lasso=args.group_lasso).resolve()


def _plan(args: argparse.Namespace) -> ModelPlan:
    return ModelPlan(model=args.model, method=args.method, block=parse_block(args.block), sparsity=args.sparsity,
                     nm=None if args.nm is None else parse_nm(args.nm), norm=args.norm, seed=args.seed,
                     overrides=tuple(args.override), tokens=args.tokens, batch=args.batch, threads=args.threads,
                     repeat=args.repeat)


def build_parser() -> argparse.ArgumentParser:
    from . import bench_recovery  # its probe knobs are flags
    from .recovery import RecoveryRequest  # as _add_recovery_args does: the request's defaults are the flags'

    parser = _Parser(prog="sparsity_app", description="Prune a layer, compile it to a TVM block-sparse "
                     "kernel, time it against dense, score the accuracy cost.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("layers", help="list a model's prunable layers and their (out, in) shapes")
    p.add_argument("--model", default=Spec().model)
    p.add_argument("--json", action="store_true", help="a JSON list of {name, shape}")

    p = sub.add_parser("run", help="measure one configuration")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    p = sub.add_parser("sweep", help="measure a grid of block shapes x sparsities on one layer")
    _add_spec_args(p, sweep=True)
    p.add_argument("--blocks", default="32x1,16x1,1x32,4x4", help="comma-separated block shapes")
    p.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95", help="comma-separated sparsities")
    p.add_argument("--nms", default="2:4,1:4", help="comma-separated N:M patterns (with --method nm)")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")
    p = sub.add_parser("model", help="prune every encoder linear, run the whole model in TVM, time and score it")
    _add_plan_args(p)
    _add_recovery_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    p = sub.add_parser("recover", help="fine-tune a pruned model (masks enforced) toward the dense one; score "
                       "before and after")
    _add_plan_args(p)
    _add_recovery_args(p, required=True)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    p = sub.add_parser("bench-recovery", help="the recovery targets' runs (300 steps each, cached), then each "
                       "target's verdict")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--only", default=None, help="only runs whose plan label or recipe contains this")
    p.add_argument("--skip-one-shot", action="store_true", help="skip the wanda vs magnitude one-shot comparison")
    p.add_argument("--skip-probe-spread", action="store_true", help="skip the polarity probe under 20 fold "
                   "assignments for the 32x1-at-50%% runs")
    p.add_argument("--stored", action="store_true", help="train nothing: the target runs already stored on this "
                   "machine by one code version (the one with most of them, named), then the verdicts")
    p.add_argument("--code", default=None, help="with --stored: this code version (a prefix of it) instead")
    for knob, (recipe, field, plan) in bench_recovery.PROBES.items():  # one flag per probe knob
        p.add_argument(f"--probe-{knob}", dest=f"probe_{knob}", default=None, metavar="VALUES", help=f"instead: the "
                       f"{field} probe, {recipe} {plan.label()} for --probe-steps steps at each of these comma-separated "
                       "values, scored by embedding fidelity to the dense model on training text (what a value is "
                       "chosen by) and by the metrics (reported)")
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--probe-loss", default="hidden", help="the probe's loss (see recover --loss)")
    p.add_argument("--lengths", default=RecoveryRequest.lengths, help="the training sequences' lengths of every run "
                   "(see recover --lengths; fixed: the table stored before mixed lengths existed, with --stored --code)")
    p.add_argument("--train-seed", type=_seed, default=RecoveryRequest.seed, help="the training data order of every "
                   "target run (default %(default)s, the one the targets are judged at; another seed shows the draw's share)")
    p.add_argument("--across-seeds", type=_seeds, default=None, metavar="SEEDS", help="with --stored: the stored "
                   "target runs of each of these training seeds (e.g. 0,1,2; a seed's runs are trained by --train-seed "
                   "N) side by side, with each seed's verdicts and the verdicts on the means over the seeds")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench-model", help="whole-model benchmark: the targets' configurations, measured afresh")
    p.add_argument("--configs", default="minilm-l6:1x128,minilm-l6:8x128,bert-base-synthetic:1x128",
                   help="comma-separated MODEL:BATCHxTOKENS")
    p.add_argument("--method", default="block")
    p.add_argument("--block", default="32x1")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeat", type=int, default=25)
    p.add_argument("--cache-dir", default=None, help="where tuned schedules are kept (default cache/)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cache", help="what the result cache holds, or clear it")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--only", choices=("results", "tuning"), default=None,
                   help="clear only stored results, or only the tuner's winning schedules")
    p.add_argument("--cache-dir", default=None, help="result cache (default cache/ or $SPARSITY_APP_CACHE_DIR)")
    p = sub.add_parser("jobs", help="the job queue of long runs (whole models): list it, or cancel a job")
    p.add_argument("action", choices=("list", "cancel"))
    p.add_argument("id", nargs="?", help="the job to cancel (cancel: the operator may cancel any job)")
    p.add_argument("--cache-dir", default=None, help="result cache (default cache/ or $SPARSITY_APP_CACHE_DIR)")
    p = sub.add_parser("worker", help="(internal) run queued jobs one at a time until none is left")
    p.add_argument("--cache-dir", default=None)
    p = sub.add_parser("loadtest", help="N app sessions (websocket clients) at once against a real `streamlit run app.py`: "
                       "results, no errors, no overlapping measurements, speedups as quiet")
    from .loadtest import add_arguments as add_loadtest_arguments

    add_loadtest_arguments(p)
    add_accuracy_parsers(sub)  # sensitivity, allocate, export (cli_accuracy.py)
    p = sub.add_parser("bench", help="kernel benchmark: every sparse format against every dense peer")
    from .bench import add_arguments

    add_arguments(p)
    return parser


def _spec(args: argparse.Namespace, **over) -> Spec:
    fields = dict(model=args.model, layer=args.layer, method=args.method, norm=args.norm,
                  tokens=args.tokens, seed=args.seed, threads=args.threads, repeat=args.repeat)
    if hasattr(args, "block"):
        fields.update(block=parse_block(args.block), sparsity=args.sparsity,
                      nm=None if args.nm is None else parse_nm(args.nm))
    fields.update(over)
    return Spec(**fields)


def _layers(args) -> None:
    from .models import get_model

    layers = get_model(args.model).layers()
    if args.json:
        print(json.dumps([{"name": l.name, "shape": list(l.shape)} for l in layers]))
    else:
        for l in layers:
            print(f"{l.name:48s} {l.shape[0]}x{l.shape[1]}")


def _run(args) -> None:
    from .experiment import run

    spec = _spec(args)
    from .experiment import STEPS

    result = run(spec, store=_open_store(args.cache_dir), progress=_steps(STEPS), retune=args.retune,
                 backend=_backend(args))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        if result.backend.get("kind") == "rpc":
            print(f"measured on {result.device}; PyTorch peers not measured there")
        print(format_table([result.row()]))


def _sweep(args) -> None:
    from .experiment import lookup, run, validate
    from .limits import current as current_limits

    if args.method == "nm":
        specs = [_spec(args, nm=parse_nm(v)) for v in args.nms.split(",") if v.strip()]
    else:
        blocks = [parse_block(b) for b in args.blocks.split(",") if b.strip()]
        specs = [_spec(args, block=b, sparsity=s) for b in blocks for s in _floats(args.sparsities)]
    current_limits().check_sweep(len(specs))
    backend = _backend(args)
    if backend.kind == "rpc":
        return _sweep_remote(args, specs, backend)
    for s in specs:  # validate the whole grid before measuring any of it
        validate(s)
    store, rows = _open_store(args.cache_dir), []
    stored = sum(lookup(s, store) is not None for s in specs)  # e.g. left by a sweep that was killed
    if stored:
        _err(f"resuming: {stored} of {len(specs)} points already stored (cached); measuring the other "
             f"{len(specs) - stored}")
    try:
        for i, spec in enumerate(specs):
            _progress(i, len(specs), spec)
            rows.append(run(spec, store=store, retune=args.retune).row())
        _progress(len(specs), len(specs), None)
    finally:  # an error or ^C mid-sweep still shows (and writes) what was measured
        if rows:
            print(format_table(rows))
            if args.csv:
                write_csv(rows, args.csv)
                _err(f"wrote {len(rows)} rows to {args.csv}")


def _open_store(directory: str | None):
    """The result store, after saying on stderr what was wrong with it (e.g. an unreadable index kept aside)."""
    from .store import Store

    store = Store(directory)
    for note in store.notes:
        _err(f"warning: {note}")
    return store

def _sweep_remote(args, specs: list[Spec], backend) -> None:
    """The grid fanned out over the RPC key's servers; each point stored as it arrives."""
    from . import remote
    from .experiment import validate
    cores = remote.probe(backend).cores
    for s in specs:  # validate the whole grid (against the device's cores) before measuring any of it
        validate(s, cores)
    finished = []

    def on_event(event) -> None:
        if event.kind != "retried":
            finished.append(event.index)
            _progress(len(finished), len(specs), None if len(finished) == len(specs) else event.spec)

    _err(f"measuring {len(specs)} points on {backend.label()}")
    report = remote.sweep(specs, backend, _open_store(args.cache_dir), retune=args.retune, on_event=on_event)
    rows = [report.results[i].row() for i in sorted(report.results)]
    for line in report.retried:
        _err(f"server lost, point retried elsewhere: {line}")
    for i, error in sorted(report.failures.items()):
        _err(f"failed: {specs[i].label()} at {specs[i].sparsity:g}: {error}")
    if rows:
        print(f"measured on {rows[0]['device']} ({report.workers} servers); PyTorch peers not measured there")
        print(format_table(rows))
        if args.csv:
            write_csv(rows, args.csv)
            _err(f"wrote {len(rows)} rows to {args.csv}")
    if report.failures:
        raise UserError(f"{len(report.failures)} of {len(specs)} points failed (see above)")


def _progress(done: int, total: int, spec: Spec | None) -> None:
    width = 30
    bar = "#" * (width * done // max(total, 1))
    what = "done" if spec is None else f"{spec.label()} @ {spec.sparsity:g}"
    end = "\n" if spec is None else ""
    sys.stderr.write(f"\r[{bar:<{width}}] {done}/{total} {what:<28}{end}")
    sys.stderr.flush()


TABLE_COLUMNS = (("pattern", "pattern", "{}"), ("format", "format", "{}"), ("sparsity_achieved", "sparsity", "{:.3f}"),
                 ("tvm_sparse_ms", "sparse ms", "{:.4f}"), ("best_dense_ms", "best dense ms", "{:.4f}"),
                 ("best_dense", "best dense", "{}"), ("speedup_vs_best_dense", "vs best", "{:.2f}x"),
                 ("speedup_vs_tvm_dense", "vs tvm", "{:.2f}x"), ("speedup_vs_torch_dense", "vs torch", "{:.2f}x"),
                 ("ideal_speedup", "ideal", "{:.2f}x"), ("output_cosine", "out cos", "{:.3f}"),
                 ("lee_pearson", "lee r", "{:.3f}"), ("tune_s", "tune s", "{:.2f}"), ("compile_s", "compile s", "{:.2f}"),
                 ("cached", "cached", "{}"))


def format_table(rows: list[dict]) -> str:
    head = [title for _, title, _ in TABLE_COLUMNS]
    body = [[("-" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in TABLE_COLUMNS] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head, *body]]
    note = "" if all(r.get("lee_pearson") is not None for r in rows) else \
        "\n(synthetic weights: accuracy columns mean nothing)" if any(r["model"].endswith("synthetic") for r in rows) else ""
    return "\n".join(lines) + note


def write_csv(rows: list[dict], path: str) -> None:
    try:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _steps(steps: tuple[str, ...], indent: str = ""):
    """A progress callback printing '[3/7 compile] detail' on stderr (other messages, e.g. queue, as they come)."""
    def show(step: str, detail: str) -> None:
        where = f"{steps.index(step) + 1}/{len(steps)} {step}" if step in steps else step
        _err(f"{indent}[{where}] {detail}")
    return show


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _model(args) -> None:
    from .model_experiment import STEPS, run_model, validate

    plan = _plan(args)
    validate(plan)  # every bad input before anything loads
    request = None if args.recipe is None else _recovery_request(args, plan)
    store = _open_store(args.cache_dir)
    recovered = None if request is None else _recovered(request, store, args.time_limit)
    result = run_model(plan, store=store, retune=args.retune, progress=_steps(STEPS), recovery=recovered)
    print(json.dumps(result.to_dict()) if args.json else format_model(result.to_dict()))


def _recovered(request, store, time_limit: float | None):
    from .recovery import STEPS, recover

    return recover(request, store=store, progress=_steps(STEPS), time_limit_s=time_limit)


def _bench_recovery(args) -> None:
    from . import bench_recovery
    from .recovery import RecoveryRequest

    store, results = _open_store(args.cache_dir), []
    asked = [(knob, v) for knob in bench_recovery.PROBES if (v := getattr(args, f"probe_{knob}")) is not None]
    if len(asked) > 1:
        raise UserError("probe one knob at a time: " + " or ".join(f"--probe-{k}" for k in bench_recovery.PROBES))
    if args.code is not None and (not args.stored or not args.code):
        raise UserError("--code names the stored runs to print (a non-empty prefix of a code version): use it with "
                        "--stored")
    if args.stored and asked:
        raise UserError("--stored trains nothing, a probe trains: use one or the other")
    if args.across_seeds is not None:
        return _bench_recovery_across_seeds(args, store)
    knob, given = asked[0] if asked else ("lr", None)
    field = bench_recovery.PROBES[knob][1]  # the RecoveryRequest field the probe varies
    if given is not None:
        try:
            values = [float(v) for v in given.split(",")]
        except ValueError:
            raise UserError(f"--probe-{knob} takes comma-separated numbers, got {given!r}") from None
        rows, probes = [], [r.resolve() for r in bench_recovery.probe_requests(values, args.probe_steps,
                                                                              args.probe_loss, knob, args.lengths)]
        for request in probes:  # every bad value said before anything trains
            _err(f"[probe] {request.label()}, {knob} {getattr(request, field):g}, "
                 f"lr {request.lr:g}, loss {request.loss}")
            r = _recovered(request, store, None)
            rows.append({knob: getattr(request, field), "recipe": request.recipe,
                         "loss": request.loss, "steps": r.steps_done, "train_s": round(r.wall_s),
                         "last_loss": r.loss[-1][1], "fidelity": round(bench_recovery.fidelity(
                             store.recovered_weights(r.key)[0]), 4), "lee": round(r.metrics_after["lee_pearson"], 3),
                         "probe": round(r.metrics_after["polarity_probe_acc"], 3)})
        if args.json:
            print(json.dumps(rows))
        else:
            import pandas as pd

            print(pd.DataFrame(rows).to_string(index=False))
        return
    todo = [r.resolve() for r in bench_recovery.requests(args.steps, args.only, args.lengths,  # a bad flag: one line
                                                         args.train_seed)]
    if args.stored:
        results, code = bench_recovery.stored_runs(todo, store, args.code)
        _err(f"{len(results)} of {len(todo)} target runs stored by code version {code}" if results else
             "no target run is stored on this machine" + (f" by code version {args.code}" if args.code else ""))
        todo = []
    for i, request in enumerate(todo, 1):
        _err(f"[run {i}/{len(todo)}] {request.label()}")
        try:
            results.append(_recovered(request, store, None))  # resolved above
        except UserError as e:  # one run that cannot go (e.g. stopped): say so, keep the others
            _err(f"  {e}")
            continue
        _err(format_recovery(results[-1].to_dict()))
    one_shot = []
    if not args.skip_one_shot:
        for magnitude, wanda in bench_recovery.ONE_SHOT:
            _err(f"[one-shot] {magnitude.label()} vs {wanda.label()}")
            one_shot.append((magnitude.label(), bench_recovery.one_shot_metrics(magnitude)["lee_pearson"],
                             bench_recovery.one_shot_metrics(wanda)["lee_pearson"]))
    lines, spread = bench_recovery.verdicts(results, one_shot), []
    if args.train_seed != RecoveryRequest.seed:
        lines = [f"training seed {args.train_seed}: {line}" for line in lines]
    if not args.skip_probe_spread:
        _err("[probe spread] the polarity probe of the dense model and each 32x1-at-50% run, 20 draws of its folds")
        spread = bench_recovery.probe_spread_lines(results, store)
    if args.json:
        print(json.dumps({"runs": [r.to_dict() for r in results], "one_shot": one_shot, "verdicts": lines,
                          "probe_spread": spread}))
    else:
        import pandas as pd

        print("\n".join([pd.DataFrame([{"plan": r.request.plan.label(), "recipe": r.request.recipe, "steps": r.steps_done,
                                        "wall_min": round(r.wall_s / 60, 1),
                                        **{f"{k}_{when}": round(getattr(r, f"metrics_{when}")[k], 3)
                                           for k in ("lee_pearson", "polarity_probe_acc") for when in ("before", "after")}}
                                       for r in results]).to_string(index=False), *lines, *spread]))


def _bench_recovery_across_seeds(args, store) -> None:
    """bench-recovery --stored --across-seeds 0,1,2: trains nothing; every seed's runs of one code version."""
    from . import bench_recovery
    from .recovery import RecoveryRequest

    if not args.stored:
        raise UserError("--across-seeds reads stored runs and trains nothing: add --stored (a seed's runs are "
                        "trained by bench-recovery --train-seed N)")
    if args.train_seed != RecoveryRequest.seed:
        raise UserError("--across-seeds names the seeds itself: leave out --train-seed")
    by_seed, code = {}, args.code
    for seed in args.across_seeds:
        todo = [r.resolve() for r in bench_recovery.requests(args.steps, args.only, args.lengths, seed)]
        by_seed[seed], found = bench_recovery.stored_runs(todo, store, code)
        code = code or found  # the first seed with runs fixes the code version: seeds are never mixed across versions
        _err(f"training seed {seed}: {len(by_seed[seed])} of {len(todo)} target runs stored"
             + (f" by code version {found}" if found else ""))
    rows, mean_lines = bench_recovery.across_seeds(by_seed)
    seeds = ", ".join(map(str, args.across_seeds))
    lines = [f"training seed {seed}: {line}" for seed, runs in by_seed.items()
             for line in bench_recovery.target_verdicts(runs)]
    lines += [f"mean over training seeds {seeds}: {line}" for line in mean_lines]
    if args.json:
        print(json.dumps({"seeds": list(args.across_seeds), "code": code, "rows": rows, "verdicts": lines}))
    else:
        import pandas as pd

        table = pd.DataFrame(rows).to_string(index=False) if rows else f"no target run is stored at every seed ({seeds})"
        print("\n".join([table, *lines]))


def _recover(args) -> None:
    request = _recovery_request(args, _plan(args))
    result = _recovered(request, _open_store(args.cache_dir), args.time_limit)
    print(json.dumps(result.to_dict()) if args.json else format_recovery(result.to_dict()))


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


def format_model(d: dict) -> str:
    """A whole-model result as text: times, speedups, breakdown, metrics beside the dense model's."""
    t = d["times_ms"]
    lines = [f"{d['plan']['model']}: {d['plan']['label']}, batch {d['plan']['batch']} x {d['plan']['tokens']} tokens, "
             f"{d['plan']['threads']} threads; achieved sparsity {d['sparsity_achieved']:.3f}; max relative error vs "
             f"masked PyTorch {d['max_abs_error']:.1e}" + ("  (cached)" if d["cached"] else "")]
    for name, timing in t.items():
        ratio = "" if name == "tvm_sparse" else f"   sparse is {timing['median'] / t['tvm_sparse']['median']:.2f}x faster"
        lines.append(f"  {name:20s} {timing['median']:9.3f} ms  (spread {timing['spread']:.3f}){ratio}")
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


def _bench_model(args) -> None:
    from .model_experiment import STEPS, run_model, validate

    plans = []
    for item in args.configs.split(","):
        model, _, shape = item.strip().partition(":")
        try:
            batch, tokens = parse_block(shape or "1x128")
        except UserError:
            raise UserError(f"--configs entries must look like minilm-l6:1x128 (MODEL:BATCHxTOKENS), got {item!r}") from None
        plan = ModelPlan(model=model, method=args.method, block=parse_block(args.block), sparsity=args.sparsity,
                         tokens=tokens, batch=batch, threads=args.threads, repeat=args.repeat)
        validate(plan)
        plans.append(plan)
    store, rows = _open_store(args.cache_dir), []
    for plan in plans:  # each run_model holds the measurement slot while it measures
        _err(f"measuring {plan.model}, {plan.label()}, {plan.batch}x{plan.tokens} tokens...")
        d = run_model(plan, store=store, reuse_result=False, progress=_steps(STEPS, "  "))
        rows.append(d.to_dict())
        if not args.json:
            print(format_model(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows))
    else:
        print(model_targets(rows))


def model_targets(rows: list[dict]) -> str:
    """The issue's end-to-end targets, checked on the rows of this run."""
    out = ["", "== targets (end to end, same measure call per row)"]
    for d in rows:
        t = {k: v["median"] for k, v in d["times_ms"].items()}
        where = f"{d['plan']['model']} {d['plan']['batch']}x{d['plan']['tokens']}"
        for peer, goal in (("torch_eager", 5.0), ("onnxruntime", 4.0), ("tvm_dense", 2.5)):
            ratio = t[peer] / t["tvm_sparse"]
            out.append(f"{where}: vs {peer} {ratio:.2f}x (>= {goal}) {'ok' if ratio >= goal else 'MISSED'}")
        fair = t["torch_eager"] / t["tvm_dense"]
        out.append(f"{where}: TVM dense at {fair:.2f}x PyTorch eager's speed (>= 1) {'ok' if fair >= 1 else 'MISSED'}")
        out.append(f"{where}: sparse vs masked PyTorch relative error {d['max_abs_error']:.1e} (<= 1e-4) "
                   f"{'ok' if d['max_abs_error'] <= 1e-4 else 'MISSED'}")
    return "\n".join(out)


def _cache(args) -> None:

    store = _open_store(args.cache_dir)
    if args.action == "clear":
        results, tunings = store.clear(results=args.only != "tuning", tuning=args.only != "results")
        print(f"cleared {results} results and {tunings} tuned schedules from {store.directory}")
    else:
        print(f"{store.directory}: {len(store)} results, {store.tunings()} tuned schedules")


def _jobs(args) -> None:
    from . import jobs

    if args.action == "cancel":
        if not args.id:
            raise UserError("jobs cancel needs the job's id (see `python -m sparsity_app jobs list`)")
        job = jobs.cancel(args.id, None, args.cache_dir, force=True)
        print(f"{job.id}: {'cancelled' if job.state == 'cancelled' else 'stopping (it was running)'}")
        return
    for job in jobs.list_jobs(args.cache_dir):
        where = f"{job.position} ahead" if job.state == "queued" else (job.error or job.result_key or "")
        last = job.progress[-1]["detail"] if job.progress and job.state == "running" else ""
        print(f"{job.id}  {job.kind:8s} {job.state:9s} {time.strftime('%Y-%m-%d %H:%M', time.localtime(job.submitted))}"
              f"  {where or last}")


def _worker(args) -> None:
    from . import jobs

    jobs.work(args.cache_dir)


COMMANDS = {"layers": _layers, "run": _run, "sweep": _sweep, "model": _model, "bench-model": _bench_model,
            "cache": _cache, "recover": _recover, "bench-recovery": _bench_recovery, "jobs": _jobs, "worker": _worker,
            **ACCURACY_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "bench":
            from .bench import main as bench_main

            return bench_main(args)
        if args.command == "loadtest":
            from .loadtest import main as loadtest_main

            return loadtest_main(args)
        COMMANDS[args.command](args)
        return 0
    except UserError as e:
        _err(f"error: {e}")
        return 2
    except BrokenPipeError:  # e.g. `| head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as e:  # a bug, not bad input: still one line, full trace on request
        if os.environ.get("SPARSITY_APP_DEBUG"):
            raise
        from .errors import one_line

        _err(f"internal error: {type(e).__name__}: {one_line(e)} (set SPARSITY_APP_DEBUG=1 for the traceback)")
        return 1
