"""The whole-model commands: `model` (prune every linear, compile, time, score) and `recover` (fine-tune)."""
from __future__ import annotations

import dataclasses
import json

from sparsity_app.cli import flags
from sparsity_app.runs import resolve
from sparsity_app.runs.model import STEPS, run_model
from sparsity_app.serve.report import format_model, format_recovery, open_store, steps_to_stderr


def add_parsers(sub) -> None:
    p = sub.add_parser("model", help="prune every encoder linear, run the whole model in TVM, time and score it")
    flags.add_plan_args(p)
    flags.add_precision_arg(p, "every encoder linear's (a layer left dense runs the dense INT8 kernel; the rest of "
                            "the graph stays float32)")
    flags.add_recovery_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    p = sub.add_parser("recover", help="fine-tune a pruned model (masks enforced) toward the dense one; score "
                       "before and after")
    flags.add_plan_args(p)
    flags.add_recovery_args(p, required=True)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def _model(args) -> None:
    plan = dataclasses.replace(flags.plan(args), precision=args.precision)
    resolved = resolve.plan(plan)  # every bad input before anything loads
    request = None if args.recipe is None else flags.recovery_request(args, plan, resolved)
    store = open_store(args.cache_dir)
    recovered = None if request is None else flags.recovered(request, store, args.time_limit)
    result = run_model(resolved, store=store, retune=args.retune, progress=steps_to_stderr(STEPS), recovery=recovered)
    print(json.dumps(result.to_dict()) if args.json else format_model(result.to_dict()))


def _recover(args) -> None:
    request = flags.recovery_request(args, flags.plan(args))
    result = flags.recovered(request, open_store(args.cache_dir), args.time_limit)
    print(json.dumps(result.to_dict()) if args.json else format_recovery(result.to_dict()))


COMMANDS = {"model": _model, "recover": _recover}
