"""python -m sparsity_app bench-model: the whole-model targets' configurations, measured afresh,
and each target's verdict (a command, never a test)."""
from __future__ import annotations

import dataclasses
import json

from sparsity_app.bench import lengths
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ModelPlan, parse_block, parse_floats
from sparsity_app.core.store import Store
from sparsity_app.runs import resolve
from sparsity_app.runs.model import STEPS, run_model
from sparsity_app.serve.report import format_model, say, steps_to_stderr


def main(args) -> int:
    if args.lengths is not None and args.real:
        raise UserError("give --lengths or --real, not both")
    if args.precision != "fp32" and (args.lengths is not None or args.real):
        raise UserError("--lengths and --real time float32 plans only (INT8 whole models: the --configs runs)")
    if args.lengths is not None:
        return _lengths(args)
    if args.real:
        return _real(args)
    plans = []
    for item in args.configs.split(","):
        model, _, shape = item.strip().partition(":")
        try:
            batch, tokens = parse_block(shape or "1x128")
        except UserError:
            raise UserError(f"--configs entries must look like minilm-l6:1x128 (MODEL:BATCHxTOKENS), got {item!r}") from None
        plan = ModelPlan(model=model, method=args.method, block=parse_block(args.block), sparsity=args.sparsity,
                         tokens=tokens, batch=batch, threads=args.threads, repeat=args.repeat, precision=args.precision)
        resolve.plan(plan)
        plans.append(plan)
    store, rows = Store(args.cache_dir), []
    for plan in plans:  # each run_model holds the measurement slot while it measures
        say(f"measuring {plan.model}, {plan.label()}, {plan.batch}x{plan.tokens} tokens...")
        d = run_model(plan, store=store, reuse_result=False, progress=steps_to_stderr(STEPS, "  "))
        rows.append(d.to_dict())
        if not args.json:
            print(format_model(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows))
    else:
        print(model_targets(rows))
    return 0


def _lengths(args) -> int:
    """--lengths: the first config's model and batch at every length (one plan each, resolved here, the door)."""
    model, _, shape = args.configs.split(",")[0].strip().partition(":")
    batch, _ = parse_block(shape or "1x128")
    plans = [resolve.plan(ModelPlan(model=model, method=args.method, block=parse_block(args.block),
                                    sparsity=args.sparsity, tokens=tokens, batch=batch, threads=args.threads,
                                    repeat=args.repeat))
             for tokens in lengths.parse_lengths(args.lengths)]
    say(f"timing {model}, {plans[0].plan.label()}, batch {batch}, at {len(plans)} lengths...")
    return _print(lengths.time_lengths(plans, Store(args.cache_dir)), args.json, lengths.format_lengths,
                  lengths.length_targets)


def _real(args) -> int:
    """--real: the first config's model on real text, batch sizes from --real-batches (resolved here, the door)."""
    model = args.configs.split(",")[0].strip().partition(":")[0]
    sizes = parse_floats(args.real_batches)
    if not sizes or any(not 1 <= b <= 64 or b != int(b) for b in sizes):  # NaN fails the range first
        raise UserError(f"--real-batches must be batch sizes between 1 and 64, like 1,8; got {args.real_batches!r}")
    plan = resolve.plan(ModelPlan(model=model, method=args.method, block=parse_block(args.block),
                                  sparsity=args.sparsity, tokens=128, threads=args.threads, repeat=args.repeat))
    say(f"timing {model}, {plan.plan.label()}, on real text in batches of {args.real_batches}...")
    return _print(lengths.time_real(plan, tuple(int(b) for b in sizes), Store(args.cache_dir)), args.json,
                  lengths.format_real, lengths.real_targets)


def _print(rows: list[dict], as_json: bool, table, targets) -> int:
    """The rows of --lengths or --real: JSON (Timings as dicts), or their table and verdicts."""
    if as_json:
        print(json.dumps([{**row, "times_ms": {k: dataclasses.asdict(t) for k, t in row["times_ms"].items()}}
                          for row in rows]))
    else:
        print(table(rows))
        print(targets(rows))
    return 0


def model_targets(rows: list[dict]) -> str:
    """The issue's end-to-end targets, checked on the rows of this run."""
    out = ["", "== targets (end to end, same measure call per row)"]
    for d in rows:
        t = {k: v["median"] for k, v in d["times_ms"].items()}
        where = f"{d['plan']['model']} {d['plan']['batch']}x{d['plan']['tokens']}"
        if d["plan"].get("precision", "fp32") == "int8":
            out += _int8_targets(t, f"{where} {d['plan']['precision']}", d["max_abs_error"])
            continue
        for peer, goal in (("torch_eager", 5.0), ("onnxruntime", 4.0), ("tvm_dense", 2.5)):
            ratio = t[peer] / t["tvm_sparse"]
            out.append(f"{where}: vs {peer} {ratio:.2f}x (>= {goal}) {'ok' if ratio >= goal else 'MISSED'}")
        fair = t["torch_eager"] / t["tvm_dense"]
        out.append(f"{where}: TVM dense at {fair:.2f}x PyTorch eager's speed (>= 1) {'ok' if fair >= 1 else 'MISSED'}")
        out.append(f"{where}: sparse vs masked PyTorch relative error {d['max_abs_error']:.1e} (<= 1e-4) "
                   f"{'ok' if d['max_abs_error'] <= 1e-4 else 'MISSED'}")
    return "\n".join(out)


def _int8_targets(t: dict[str, float], where: str, error: float) -> list[str]:
    """The INT8 issue's end-to-end targets on one INT8 row (ms medians of one measure call)."""
    sparse = t["tvm_sparse"]
    out = [f"{where}: TVM sparse INT8 {sparse:.2f} ms (<= 1.6) {'ok' if sparse <= 1.6 else 'MISSED'}"]
    for peer, goal, what in (("tvm_sparse_fp32", 1.7, "the same masks in float32"),
                             ("onnxruntime_int8", 5.0, "ONNX Runtime INT8"), ("onnxruntime", 11.0, "ONNX Runtime fp32")):
        ratio = t[peer] / sparse
        out.append(f"{where}: vs {what} {ratio:.2f}x (>= {goal}) {'ok' if ratio >= goal else 'MISSED'}")
    dense = t["onnxruntime_int8"] / t["tvm_dense_int8"]
    out.append(f"{where}: TVM dense INT8 at {dense:.2f}x ONNX Runtime INT8's speed (> 1) {'ok' if dense > 1 else 'MISSED'}")
    out.append(f"{where}: sparse vs its INT8 PyTorch reference, relative error {error:.1e} (<= 0.2, "
               f"model/graph.py: tolerance) {'ok' if error <= 0.2 else 'MISSED'}")
    return out
