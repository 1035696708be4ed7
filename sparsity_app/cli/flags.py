"""What the CLI's commands share: their flags, the request each builds from them, and small helpers.

Each request is built here and resolved once (runs.resolve) by the command that runs it.
"""
from __future__ import annotations

import argparse

from sparsity_app.accuracy.recipes import LENGTHS, RECIPES
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import (BLOCK_PRESETS, NORMS, PRECISIONS, ModelPlan, RecoveryRequest, ResolvedPlan,
                                        ResolvedRecovery, Spec, parse_block, parse_nm)
from sparsity_app.measure.backend import LOCAL, Backend
from sparsity_app.prune.methods import METHODS
from sparsity_app.runs import resolve
from sparsity_app.runs.recover import STEPS, recover
from sparsity_app.serve.report import steps_to_stderr


def one_of(registry: dict, what: str, plural: str):
    """An argparse type: a name in `registry`, read when the flag is parsed (a registered item is a choice)."""
    def name(text: str) -> str:
        if text not in registry:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; valid {plural}: {', '.join(registry)}")
        return text
    return name


def names(registry: dict) -> str:
    """The registry's names for a flag's usage line."""
    return "{" + ",".join(registry) + "}"


def seed(text: str) -> int:
    """A training seed: NumPy seeds the data order with it, so a non-negative integer."""
    if not text.strip().isdecimal():  # no sign, no fraction
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def seeds(text: str) -> tuple[int, ...]:
    """Two or more distinct training seeds, comma-separated (e.g. 0,1,2)."""
    seeds = tuple(seed(t) for t in text.split(","))
    if len(seeds) < 2 or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"takes two or more distinct comma-separated seeds (e.g. 0,1,2), got {text!r}")
    return seeds


def precisions(text: str) -> tuple[str, ...]:
    """Comma-separated precision names (PRECISIONS), e.g. fp32,int8."""
    names_ = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    for name in names_:
        one_of(PRECISIONS, "precision", "precisions")(name)
    if not names_:
        raise argparse.ArgumentTypeError(f"takes one or more of {', '.join(PRECISIONS)}, got {text!r}")
    return names_


def add_precision_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--precision", default="fp32", type=one_of(PRECISIONS, "precision", "precisions"),
                   metavar=names(PRECISIONS), help=f"what the kernels compute in, {what} (default %(default)s; int8 "
                   "needs blocks of a multiple of 4 input columns, e.g. 16x4)")


def add_spec_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    d = Spec()
    p.add_argument("--model", default=d.model, help="model name (default %(default)s)")
    p.add_argument("--layer", default=d.layer, help="dotted layer name (see `layers`)")
    p.add_argument("--method", default=d.method, type=one_of(METHODS, "pruning method", "methods"),
                   metavar=names(METHODS), help="pruning method (default %(default)s)")
    if not sweep:
        p.add_argument("--block", default="32x1", help=f"bs_r x bs_c, e.g. {', '.join(BLOCK_PRESETS)}")
        p.add_argument("--sparsity", type=float, default=d.sparsity, help="fraction removed, 0..0.99")
        p.add_argument("--nm", default=None, help="N:M pattern for --method nm (or random), e.g. 2:4")
        add_precision_arg(p, "the layer's")
    else:
        p.add_argument("--precisions", default=d.precision, type=precisions, metavar="fp32,int8",
                       help="precisions of the grid, comma-separated (int8 runs the blocks with a multiple of 4 "
                       "input columns; the others are left out, and said so)")
    p.add_argument("--norm", default=d.norm, choices=NORMS, help="block score norm (default %(default)s)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="rows of X (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of random pruning, or sparsegpt's calibration draw")
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


def backend(args: argparse.Namespace):
    """Where to measure: this machine, or the RPC tracker's servers of --rpc-key."""
    if args.rpc_tracker is None and args.rpc_key is None:
        if args.rpc_target:
            raise UserError("--rpc-target needs --rpc-tracker and --rpc-key")
        return LOCAL
    if args.rpc_tracker is None or args.rpc_key is None:
        raise UserError("measuring on an RPC device needs both --rpc-tracker HOST:PORT and --rpc-key KEY")
    return Backend(kind="rpc", tracker=args.rpc_tracker, key=args.rpc_key, target=args.rpc_target).resolve()


def add_plan_args(p: argparse.ArgumentParser) -> None:
    d = ModelPlan()
    p.add_argument("--model", default=d.model, help="model name (default %(default)s)")
    p.add_argument("--method", default=d.method, type=one_of(METHODS, "pruning method", "methods"),
                   metavar=names(METHODS), help="pruning method (default %(default)s)")
    p.add_argument("--block", default="32x1", help="bs_r x bs_c of every layer, e.g. 32x1")
    p.add_argument("--sparsity", type=float, default=d.sparsity, help="fraction removed from each layer")
    p.add_argument("--nm", default=None, help="N:M pattern of every layer (method nm or random), e.g. 2:4")
    p.add_argument("--norm", default=d.norm, choices=NORMS)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of random pruning, or sparsegpt's calibration draw")
    p.add_argument("--override", action="append", default=[], metavar="TARGET=VALUE",
                   help="per-layer pattern, repeatable: TARGET a role (q, k, v, qkv, attention-output, ffn-in, "
                        "ffn-out) or a layer-name glob; VALUE a sparsity, 'dense', BxC@sparsity or N:M")
    add_model_timing_args(p)
    p.add_argument("--retune", action="store_true", help="measure again and re-tune every layer's schedule")
    p.add_argument("--cache-dir", default=None, help="result cache (default cache/ or $SPARSITY_APP_CACHE_DIR)")


def add_model_timing_args(p: argparse.ArgumentParser) -> None:
    """How a whole model is timed: sequence length, batch, threads, samples (ModelPlan's defaults)."""
    d = ModelPlan()
    p.add_argument("--tokens", type=int, default=d.tokens, help="sequence length (default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per call (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="threads for every implementation (0 = all cores)")
    p.add_argument("--repeat", type=int, default=d.repeat, help="timed samples per implementation")


def add_recovery_args(p: argparse.ArgumentParser, required: bool) -> None:
    d = RecoveryRequest()
    g = p.add_argument_group("recovery fine-tune" + ("" if required else " (with --recipe: measure the recovered "
                                                     "weights instead of the one-shot ones)"))
    g.add_argument("--recipe", default="fixed" if required else None, type=one_of(RECIPES, "recipe", "recipes"),
                   metavar=names(RECIPES),
                   help="what the mask does while training" + (" (default %(default)s)" if required else ""))
    g.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (default %(default)s)")
    g.add_argument("--train-batch", type=int, default=d.batch, help="sequences of --seq-len tokens per step: the "
                   "step's tokens, however --lengths cuts them (default %(default)s)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="a step reads --train-batch x --seq-len tokens "
                   "(default %(default)s)")
    g.add_argument("--lengths", default=d.lengths, metavar=names(LENGTHS), help="sequences of --seq-len tokens only "
                   "(fixed), or steps cycling through seq-len/8, /4, /2 and seq-len tokens, as many sequences as make "
                   "the same tokens (mixed; default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default %(default)s)")
    g.add_argument("--train-seed", type=seed, default=d.seed, help="seed of the training data order")
    g.add_argument("--loss", default=d.loss, help="what the student reproduces: hidden (every layer's hidden states, "
                   "MSE) | pooled (the sentence embedding, cosine) | hidden+pooled (default %(default)s)")
    g.add_argument("--beta-schedule", default=d.beta_schedule, help="mask-decay: linear | exponential")
    g.add_argument("--decay-fraction", type=float, default=d.decay_fraction,
                   help="gradual/mask-decay/structure-decay/group-lasso: share of the steps before the final mask")
    g.add_argument("--group-lasso", type=float, default=d.group_lasso, help="group-lasso: penalty weight")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop training after this long, keeping a checkpoint that the next run resumes from")


def recovery_request(args: argparse.Namespace, plan: ModelPlan, resolved_plan: ResolvedPlan | None = None
                     ) -> ResolvedRecovery:
    """The recovery the flags ask for, of `plan` (resolved_plan: `plan`, resolved already by the command)."""
    request = RecoveryRequest(plan=plan, recipe=args.recipe, steps=args.steps, batch=args.train_batch,
                              seq_len=args.seq_len, lr=args.lr, seed=args.train_seed, beta_schedule=args.beta_schedule,
                              loss=args.loss, lengths=args.lengths, decay_fraction=args.decay_fraction,
                              group_lasso=args.group_lasso)
    return resolve.recovery(request, resolved_plan)


def plan(args: argparse.Namespace) -> ModelPlan:
    return ModelPlan(model=args.model, method=args.method, block=parse_block(args.block), sparsity=args.sparsity,
                     nm=None if args.nm is None else parse_nm(args.nm), norm=args.norm, seed=args.seed,
                     overrides=tuple(args.override), tokens=args.tokens, batch=args.batch, threads=args.threads,
                     repeat=args.repeat)


def spec(args: argparse.Namespace, **over) -> Spec:
    fields = dict(model=args.model, layer=args.layer, method=args.method, norm=args.norm,
                  tokens=args.tokens, seed=args.seed, threads=args.threads, repeat=args.repeat)
    if hasattr(args, "block"):
        fields.update(block=parse_block(args.block), sparsity=args.sparsity,
                      nm=None if args.nm is None else parse_nm(args.nm), precision=args.precision)
    fields.update(over)
    return Spec(**fields)


def recovered(request: ResolvedRecovery, store, time_limit: float | None):
    """The recovery run of `request` (stored, or trained now with its steps told on stderr)."""
    return recover(request, store=store, progress=steps_to_stderr(STEPS), time_limit_s=time_limit)
