"""The benchmark commands' flags: `bench` (kernels), `bench-model`, `bench-recovery`, `bench-oneshot`,
`bench-int8-accuracy`, `loadtest`.

Benchmarks are commands, never tests: their bodies live in sparsity_app/bench/, this module only
says what they take. The kernel benchmark and the load test load TVM or a browser protocol, so
they are imported when chosen; every other command starts without them.
"""
from __future__ import annotations

from sparsity_app.bench import (model as bench_model, oneshot as bench_oneshot, quantized as bench_quantized,
                                recovery as bench_recovery)
from sparsity_app.cli import flags
from sparsity_app.core.requests import RecoveryRequest
from sparsity_app.prune.methods import METHODS

SHAPES = ("768x768", "3072x768", "768x3072", "384x384", "1536x384", "384x1536")  # (out x in)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


def add_parsers(sub) -> None:
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
    p.add_argument("--train-seed", type=flags.seed, default=None, help="instead of the protocol: the target runs at "
                   "this one training seed only (reported, never judged)")
    p.add_argument("--across-seeds", type=flags.seeds, default=None, metavar="SEEDS", help="the training seeds every "
                   "target run is trained at (default 0,1,2: the fixed protocol); rows side by side, verdicts on the "
                   "means (with --stored: the runs stored by one code version, nothing trained)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench-oneshot", help="one-shot pruning of every MiniLM linear: magnitude, wanda and sparsegpt "
                       "(on calibration draws 0, 1, 2) per target pattern, the real-label metrics, and the verdicts")
    p.add_argument("--only", default=None, help="only the patterns whose name contains this (e.g. 2:4, 90%%)")
    p.add_argument("--seeds", type=flags.seeds, default=bench_oneshot.DRAWS, metavar="SEEDS",
                   help="sparsegpt's calibration draws (default 0,1,2: what a verdict is judged on)")
    p.add_argument("--probe-samples", default=None, metavar="VALUES", help="instead: sparsegpt on the first pattern "
                   "(draw 0) at each of these numbers of calibration sequences, scored by fidelity (what the "
                   "default is chosen by) and the metrics (reported)")
    p.add_argument("--probe-damp", default=None, metavar="VALUES", help="instead: as --probe-samples, at each of these "
                   "dampenings (lambda, a fraction of the Hessian's mean diagonal); with --probe-samples, every pair")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench-int8-accuracy", help="what INT8 costs MiniLM, dense and pruned: every real-label metric "
                       "in fp32 and with every linear in INT8 (both integer dots' arithmetic), and the dense verdict")
    p.add_argument("--only", default=None, help="only the plans whose name contains this (e.g. dense)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench-model", help="whole-model benchmark: the targets' configurations, measured afresh")
    p.add_argument("--configs", default="minilm-l6:1x128,minilm-l6:8x128,bert-base-synthetic:1x128",
                   help="comma-separated MODEL:BATCHxTOKENS")
    p.add_argument("--method", default="block", type=flags.one_of(METHODS, "pruning method", "methods"),
                   metavar=flags.names(METHODS))
    p.add_argument("--block", default="32x1")
    p.add_argument("--sparsity", type=float, default=0.9)
    flags.add_precision_arg(p, "every linear's in the configs (int8: the INT8 targets, against dense INT8 peers and "
                            "the same masks in float32; e.g. --block 16x4 --precision int8 --configs minilm-l6:1x128)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeat", type=int, default=25)
    p.add_argument("--lengths", default=None, metavar="LENGTHS",
                   help="time the first config's model and batch at each of these sentence lengths instead (e.g. "
                        "8..128, 8..128:8, 24,27,31): each implementation's ms per length, and whether the time "
                        "jumps at an awkward length")
    p.add_argument("--real", action="store_true",
                   help="time real text instead: the 200 polarity sentences and the 50 Lee documents in batches of "
                        "--real-batches, padded per batch, in sentences per second (the first config's model)")
    p.add_argument("--real-batches", default="1,8", metavar="SIZES", help="batch sizes of --real (default 1,8)")
    p.add_argument("--cache-dir", default=None, help="where tuned schedules are kept (default cache/)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="kernel benchmark: every sparse format against every dense peer")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated out x in weight shapes")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="0 = all cores; the benchmark also runs 1 thread with --also-1-thread")
    p.add_argument("--also-1-thread", action="store_true", help="repeat the whole benchmark on one thread")
    p.add_argument("--repeat", type=int, default=15, help="timed samples per implementation")
    p.add_argument("--precisions", type=flags.precisions, default=("fp32",), metavar="fp32,int8",
                   help="the precisions of the rows (default fp32): int8 adds dense INT8 peers (ours, PyTorch's dynamic "
                   "quantization) and BSR INT8 rows of blocks 32x4, 16x4, 8x4, 4x4, 1x4, all in the same measurements")
    p.add_argument("--cache-dir", default=None, help="where tuner winners are kept (default cache/)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")

    p = sub.add_parser("loadtest", help="N app sessions (websocket clients) at once against a real `streamlit run app.py`: "
                       "results, no errors, no overlapping measurements, speedups as quiet")
    p.add_argument("--sessions", type=int, default=8, help="app sessions at once (default %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="uncached runs each session submits (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="the app's port on 127.0.0.1 (default: a free one)")
    p.add_argument("--tokens", type=int, default=128, help="tokens of every configuration (default %(default)s)")
    p.add_argument("--quiet-runs", type=int, default=None, help="quiet measurements of the fixed configuration "
                   "(default: as many as the sessions, so that both medians are of equally many samples)")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative gap of the fixed configuration's "
                   "speedup, loaded vs quiet (default %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the whole load (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the private directory (server log, cache, slot log)")


def _bench(args) -> int:
    # lazy: the kernel benchmark loads TVM and PyTorch
    from sparsity_app.bench import kernels

    return kernels.main(args)


def _loadtest(args) -> int:
    # lazy: the load test loads Streamlit's websocket protocol
    from sparsity_app.bench import load

    return load.main(args)


COMMANDS = {"bench-recovery": bench_recovery.main, "bench-oneshot": bench_oneshot.main, "bench-model": bench_model.main,
            "bench-int8-accuracy": bench_quantized.main,
            "bench": _bench,
            "loadtest": _loadtest}
