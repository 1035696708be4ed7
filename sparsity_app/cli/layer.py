"""The layer commands: `layers` (a model's prunable linears), `run` (one configuration), `sweep` (a grid)."""
from __future__ import annotations

import dataclasses
import json
import sys

from sparsity_app.cli import flags
from sparsity_app.core.errors import UserError
from sparsity_app.core.limits import current as current_limits
from sparsity_app.core.requests import Spec, parse_block, parse_floats, parse_nm
from sparsity_app.model.catalog import get_model
from sparsity_app.prune.methods import METHODS
from sparsity_app.prune.quantize import int8_misfit
from sparsity_app.runs import resolve
from sparsity_app.runs.layer import STEPS, lookup, run
from sparsity_app.serve.report import format_same_pattern, format_table, open_store, say, steps_to_stderr, write_csv


def add_parsers(sub) -> None:
    p = sub.add_parser("layers", help="list a model's prunable layers and their (out, in) shapes")
    p.add_argument("--model", default=Spec().model)
    p.add_argument("--json", action="store_true", help="a JSON list of {name, shape}")

    p = sub.add_parser("run", help="measure one configuration")
    flags.add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    p = sub.add_parser("sweep", help="measure a grid of block shapes x sparsities on one layer")
    flags.add_spec_args(p, sweep=True)
    p.add_argument("--blocks", default="32x1,16x1,1x32,4x4", help="comma-separated block shapes")
    p.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95", help="comma-separated sparsities")
    p.add_argument("--nms", default="2:4,1:4", help="comma-separated N:M patterns (with --method nm)")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")


def _layers(args) -> None:
    layers = get_model(args.model).layers()
    if args.json:
        print(json.dumps([{"name": l.name, "shape": list(l.shape)} for l in layers]))
    else:
        for l in layers:
            print(f"{l.name:48s} {l.shape[0]}x{l.shape[1]}")


def _run(args) -> None:
    spec = flags.spec(args)

    result = run(spec, store=open_store(args.cache_dir), progress=steps_to_stderr(STEPS), retune=args.retune,
                 backend=flags.backend(args))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        if result.backend.get("kind") == "rpc":
            print(f"measured on {result.device}; PyTorch peers not measured there")
        print(format_table([result.row()]))
        if result.same_pattern:
            print(format_same_pattern(result))


def _sweep(args) -> None:
    if METHODS[args.method].needs_nm:
        specs = [flags.spec(args, nm=parse_nm(v), precision=p) for v in args.nms.split(",") if v.strip()
                 for p in args.precisions]
    else:
        blocks = [parse_block(b) for b in args.blocks.split(",") if b.strip()]
        specs = [flags.spec(args, block=b, sparsity=s, precision=p) for p in args.precisions for b in blocks
                 for s in parse_floats(args.sparsities)]
    left_out = {}
    for s in specs:
        if s.precision == "int8":  # the pattern as its method stores it (magnitude: 1x1), checked for INT8
            stored = resolve.spec(dataclasses.replace(s, precision="fp32"))
            if why := int8_misfit(stored.block, stored.nm):
                left_out[s.label()] = why
    if left_out:
        say(f"left out {len(left_out)} INT8 point(s) that INT8 kernels cannot run: {', '.join(left_out)} "
            f"(blocks need a multiple of 4 input columns; N:M has no INT8 kernel)")
        specs = [s for s in specs if s.label() not in left_out]
        if not specs:
            raise UserError("nothing left to measure: every point of the grid was left out (see above)")
    current_limits().check_sweep(len(specs))
    backend = flags.backend(args)
    if backend.kind == "rpc":
        return _sweep_remote(args, specs, backend)
    grid = [resolve.layer(s) for s in specs]  # the whole grid checked before measuring any of it
    store, rows = open_store(args.cache_dir), []
    stored = sum(lookup(point, store) is not None for point in grid)  # e.g. left by a sweep that was killed
    if stored:
        say(f"resuming: {stored} of {len(specs)} points already stored (cached); measuring the other "
            f"{len(specs) - stored}")
    try:
        for i, point in enumerate(grid):
            _progress(i, len(grid), point.spec)
            rows.append(run(point, store=store, retune=args.retune).row())
        _progress(len(specs), len(specs), None)
    finally:  # an error or ^C mid-sweep still shows (and writes) what was measured
        if rows:
            print(format_table(rows))
            if args.csv:
                write_csv(rows, args.csv)
                say(f"wrote {len(rows)} rows to {args.csv}")


def _sweep_remote(args, specs: list[Spec], backend) -> None:
    """The grid fanned out over the RPC key's servers; each point stored as it arrives."""
    # lazy: TVM's RPC client (and TVM) load for a remote sweep only
    from sparsity_app.runs import sweep

    cores = sweep.probe(backend).cores
    grid = [resolve.layer(s, cores) for s in specs]  # the whole grid checked (on the device's cores) first
    finished = []

    def on_event(event) -> None:
        if event.kind != "retried":
            finished.append(event.index)
            _progress(len(finished), len(specs), None if len(finished) == len(specs) else event.spec)

    say(f"measuring {len(specs)} points on {backend.label()}")
    report = sweep.sweep(grid, backend, open_store(args.cache_dir), retune=args.retune, on_event=on_event)
    rows = [report.results[i].row() for i in sorted(report.results)]
    for line in report.retried:
        say(f"server lost, point retried elsewhere: {line}")
    for i, error in sorted(report.failures.items()):
        say(f"failed: {specs[i].label()} at {specs[i].sparsity:g}: {error}")
    if rows:
        print(f"measured on {rows[0]['device']} ({report.workers} servers); PyTorch peers not measured there")
        print(format_table(rows))
        if args.csv:
            write_csv(rows, args.csv)
            say(f"wrote {len(rows)} rows to {args.csv}")
    if report.failures:
        raise UserError(f"{len(report.failures)} of {len(specs)} points failed (see above)")


def _progress(done: int, total: int, spec: Spec | None) -> None:
    width = 30
    bar = "#" * (width * done // max(total, 1))
    what = "done" if spec is None else f"{spec.label()} @ {spec.sparsity:g}"
    end = "\n" if spec is None else ""
    sys.stderr.write(f"\r[{bar:<{width}}] {done}/{total} {what:<28}{end}")
    sys.stderr.flush()


COMMANDS = {"layers": _layers, "run": _run, "sweep": _sweep}
