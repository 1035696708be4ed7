"""The door's one check: a request in, its resolved (validated, canonical) form out.

`layer(spec)` -> ResolvedSpec (the Spec and its layer's (out, in) shape); `plan(plan)` ->
ResolvedPlan (the plan and every prunable layer's Spec, or None for a layer left dense);
`recovery(request)` -> ResolvedRecovery. A door (CLI command, page, job submission, the Python API's
`run`) calls one of them once; everything below takes the resolved object. Canonical means fields a method ignores take fixed
values, so two requests that mean the same experiment share one cache entry. Every error is a
UserError of one line that says what to change. Cheap: no weights are read and nothing compiles,
so a door can resolve a whole grid before measuring any of it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from sparsity_app.accuracy.recipes import BETA_SCHEDULES, LENGTHS, LOSSES, MAX_STEPS, RECIPES
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import (MAX_BATCH, MAX_REPEAT, MAX_SEQ, MAX_SPARSITY, MAX_TOKENS, NORMS, PRECISIONS,
                                        ModelPlan, RecoveryRequest, ResolvedPlan, ResolvedRecovery, ResolvedSpec, Spec,
                                        canonical_override, default_threads, parse_block, parse_nm)
from sparsity_app.model.catalog import get_model, layer_info
from sparsity_app.prune.methods import METHODS
from sparsity_app.prune.quantize import int8_misfit

# What `recovery` gives the knobs a recipe ignores: fixed values, not the current defaults, so that tuning one
# recipe's default (group-lasso's penalty went from 2e-5 to 2e-6) leaves every other recipe's stored runs theirs.
# These are the defaults the first stored runs were made with; changing one orphans those runs.
_IGNORED_KNOBS = {"decay_fraction": 2 / 3, "mask_interval": 10, "beta_schedule": "linear", "sr_ste_decay": 2e-4,
                  "group_lasso": 2e-5, "checkpoint_every": 25}
_TIMING_DEFAULTS = ModelPlan()  # a recovery's plan keeps these timing fields: they do not change the weights


def spec(request: Spec, cores: int | None = None) -> Spec:
    """The canonical Spec; validates everything that needs no model.

    cores: threads the measuring device has (default: this machine's; a remote device's for RPC).
    """
    return _spec(request, cores)


def layer(request: Spec, cores: int | None = None) -> ResolvedSpec:
    """The canonical Spec and its layer's (out, in) shape; UserError for anything unmeasurable
    (unknown model or layer, a block that does not tile the layer, ...).

    cores: as in `spec` (a remote device's, for RPC)."""
    resolved = _spec(request, cores)
    shape = layer_info(resolved.model, resolved.layer).shape
    resolved.check_shape(shape)
    return ResolvedSpec(resolved, shape)


def plan_fields(request: ModelPlan) -> ModelPlan:
    """The canonical plan, checking everything that needs no model's layers (batch, tokens, the
    default pattern, each override's syntax)."""
    return _plan_fields(request)


def plan(request: ModelPlan) -> ResolvedPlan:
    """The canonical plan and each prunable layer's canonical Spec (None: the layer is left dense).

    Raises UserError naming the first layer whose pattern does not fit it.
    """
    return _plan(request)


# The public functions above are what doors call (a test counts them); those below do the work.

def _spec(request: Spec, cores: int | None) -> Spec:
    s = request
    if s.method not in METHODS:
        raise UserError(f"unknown pruning method {s.method!r}; valid methods: {', '.join(METHODS)}")
    if s.norm not in NORMS:
        raise UserError(f"unknown norm {s.norm!r}; valid norms: {', '.join(NORMS)}")
    if not isinstance(s.tokens, int) or not 1 <= s.tokens <= MAX_TOKENS:
        raise UserError(f"tokens must be an integer in [1, {MAX_TOKENS}], got {s.tokens}")
    if not isinstance(s.repeat, int) or not 3 <= s.repeat <= MAX_REPEAT:
        raise UserError(f"repeat must be an integer in [3, {MAX_REPEAT}], got {s.repeat}")
    cores = cores or default_threads()
    if not isinstance(s.threads, int) or not 0 <= s.threads <= cores:
        raise UserError(f"threads must be between 1 and {cores} on the measuring device "
                        f"(0 = all cores), got {s.threads}")
    block = tuple(int(b) for b in s.block)
    if len(block) != 2 or min(block) < 1:
        raise UserError(f"block must be two positive sizes bs_r x bs_c, got {s.block}")
    nm = None if s.nm is None else tuple(int(v) for v in s.nm)
    if nm is not None and not 1 <= nm[0] < nm[1]:
        raise UserError(f"N:M needs 1 <= N < M, got {nm[0]}:{nm[1]}")
    method = METHODS[s.method]
    if method.needs_nm and nm is None:
        raise UserError(f"method {s.method} needs an N:M pattern, e.g. --nm 2:4")
    sparsity = float(s.sparsity)
    if nm is not None and (method.needs_nm or method.takes_nm):
        sparsity, block = 1 - nm[0] / nm[1], (1, 1)  # N:M fixes the sparsity; stored weight by weight
    else:
        nm = None
        if not 0.0 <= sparsity <= MAX_SPARSITY:
            raise UserError(f"sparsity must be in [0, {MAX_SPARSITY}], got {s.sparsity}")
        if not method.takes_block:
            block = (1, 1)
    norm = s.norm if method.takes_norm and block != (1, 1) else "l2"
    seed = s.seed if method.takes_seed else 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be a non-negative integer (below 2**32), got {s.seed!r}")
    if s.precision not in PRECISIONS:
        raise UserError(f"unknown precision {s.precision!r}; valid precisions: {', '.join(PRECISIONS)}")
    if s.precision == "int8" and (why := int8_misfit(block, nm)):
        raise UserError(why)
    return dataclasses.replace(s, block=block, nm=nm, sparsity=round(sparsity, 6), norm=norm,
                               seed=int(seed), threads=s.threads or cores)


def _plan_fields(request: ModelPlan) -> ModelPlan:
    p = request
    if not isinstance(p.batch, int) or not 1 <= p.batch <= MAX_BATCH:
        raise UserError(f"batch must be an integer in [1, {MAX_BATCH}], got {p.batch}")
    if not isinstance(p.tokens, int) or not 2 <= p.tokens <= MAX_SEQ:  # [CLS] and [SEP] at least
        raise UserError(f"tokens (the sequence length) must be an integer in [2, {MAX_SEQ}], got {p.tokens}")
    default = _spec(p.default_pattern(), None)
    return dataclasses.replace(p, method=default.method, block=default.block, sparsity=default.sparsity,
                               nm=default.nm, norm=default.norm, seed=default.seed,
                               overrides=tuple(canonical_override(o) for o in p.overrides), threads=default.threads)


def _plan(request: ModelPlan) -> ResolvedPlan:
    resolved = _plan_fields(request)
    layers = []
    for info in get_model(resolved.model).layers():
        pattern = _layer_pattern(resolved, info.name)
        if pattern is not None:
            pattern = _spec(pattern, None)
            pattern.check_shape(info.shape)
        layers.append((info.name, pattern))
    return ResolvedPlan(resolved, tuple(layers))


def recovery(request: RecoveryRequest, resolved_plan: ResolvedPlan | None = None) -> ResolvedRecovery:
    """The canonical recovery request (knobs its recipe ignores take fixed values: one cache entry)
    with its plan resolved (as `plan`, timing fields at fixed values: they do not change the weights).

    resolved_plan: `plan(request.plan)` when the door has it already (the plan a recovered model is
    then measured with), so the plan is not validated twice.
    """
    r = request
    if r.plan.precision != "fp32":
        raise UserError("recovery trains float32 weights: recover the fp32 plan (INT8 of recovered weights is not built yet)")
    t = _TIMING_DEFAULTS  # the plan's timing fields do not change the weights: one entry whatever they are
    if resolved_plan is not None:
        weights_plan = resolved_plan.with_timing(tokens=t.tokens, batch=t.batch, repeat=t.repeat, threads=default_threads())
    else:
        weights_plan = _plan(dataclasses.replace(r.plan, tokens=t.tokens, batch=t.batch, repeat=t.repeat, threads=0))
    if r.recipe not in RECIPES:
        raise UserError(f"unknown recipe {r.recipe!r}; valid recipes: {', '.join(RECIPES)}")
    for name, value, low, high in (("steps", r.steps, 1, MAX_STEPS), ("batch", r.batch, 1, 64),
                                   ("seq_len", r.seq_len, 8, 512), ("mask_interval", r.mask_interval, 1, 1000),
                                   ("checkpoint_every", r.checkpoint_every, 1, MAX_STEPS)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise UserError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    for name, value, low, high in (("lr", r.lr, 1e-7, 1e-1), ("decay_fraction", r.decay_fraction, 0.0, 0.9),
                                   ("sr_ste_decay", r.sr_ste_decay, 0.0, 1.0),
                                   ("group_lasso", r.group_lasso, 0.0, 1.0)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            raise UserError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    if r.loss not in LOSSES:
        raise UserError(f"unknown loss {r.loss!r}; valid losses: {', '.join(LOSSES)}")
    if r.lengths not in LENGTHS:
        raise UserError(f"unknown lengths {r.lengths!r}; valid: {', '.join(LENGTHS)}")
    if r.beta_schedule not in BETA_SCHEDULES:
        raise UserError(f"unknown beta schedule {r.beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
    if not get_model(weights_plan.plan.model).real_weights:
        raise UserError(f"{weights_plan.plan.model} has random weights: there is no accuracy to recover (use minilm-l6)")
    d, name = _IGNORED_KNOBS, r.recipe
    knobs = RECIPES[name].knobs
    resolved = dataclasses.replace(
        r, plan=weights_plan.plan,
        lr=float(r.lr),
        decay_fraction=float(r.decay_fraction) if "decay_fraction" in knobs else d["decay_fraction"],
        mask_interval=r.mask_interval if "mask_interval" in knobs else d["mask_interval"],
        beta_schedule=r.beta_schedule if "beta_schedule" in knobs else d["beta_schedule"],
        sr_ste_decay=float(r.sr_ste_decay) if "sr_ste_decay" in knobs else d["sr_ste_decay"],
        group_lasso=float(r.group_lasso) if "group_lasso" in knobs else d["group_lasso"],
        checkpoint_every=d["checkpoint_every"])  # where checkpoints fall does not change the result
    RECIPES[name].phase(resolved, weights_plan.specs, 0)  # a recipe that does not fit the plan says so now
    return ResolvedRecovery(resolved, weights_plan)


def _layer_pattern(plan: ModelPlan, layer: str) -> Spec | None:
    """The layer's Spec after the plan's overrides (not yet canonical), or None for a layer left dense."""
    fields: dict | None = plan.default_fields()
    for value in plan.overrides_of(layer):
        fields = _apply(fields or plan.default_fields(), value)
    if fields is None or (fields["nm"] is None and not METHODS[fields["method"]].needs_nm and fields["sparsity"] == 0):
        return None
    return plan.layer_spec(layer, fields)


def _apply(fields: dict, value: str) -> dict | None:
    """A layer's pruning fields after one override VALUE (None: left dense). The method is kept where it
    can follow the new pattern (the registry says which can), else the plain method of that pattern."""
    if value == "dense":
        return None
    fields, method = dict(fields), METHODS[fields["method"]]
    if ":" in value:
        fields.update(method=fields["method"] if method.takes_nm else "nm", nm=parse_nm(value))
    elif "@" in value:
        block, sparsity = value.split("@", 1)
        fields.update(block=parse_block(block), sparsity=float(sparsity), nm=None,
                      method=fields["method"] if method.takes_block else "block")
    else:
        fields.update(sparsity=float(value))
        if fields["nm"] is not None:  # a sparsity, not a pattern: unstructured
            fields.update(method=fields["method"] if method.unstructured else "magnitude", nm=None, block=(1, 1))
    return fields
