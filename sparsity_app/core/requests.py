"""The requests: `Spec` (one layer), `ModelPlan` (the whole model), `RecoveryRequest` (fine-tuning).

Plain frozen data, each with its one serialised form (`to_dict` / `from_dict`: the store, jobs and
links all use it). A request is validated and made canonical once, at the door, by
`runs.resolve` (fields a method ignores are set to fixed values, so two requests that mean the
same experiment share one cache entry); everything below takes the resolved request.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shlex
from typing import Any

from sparsity_app.core.errors import UserError

# the last three before 1x1 fit INT8's integer dot (a multiple of 4 input columns), as do 1x32, 4x4, 8x8, 16x16
BLOCK_PRESETS = ("32x1", "16x1", "8x1", "4x1", "1x32", "4x4", "8x8", "16x16", "32x4", "16x4", "1x4", "1x1")
NM_PRESETS = ("2:4", "1:4", "4:8")
NORMS = ("l2", "l1")
PRECISIONS = {  # name -> what the kernels compute in (the dense peers include this precision's)
    "fp32": "float32 weights and activations",
    "int8": "INT8: per-row weight scales, activations quantized per token at run time, int32 accumulation",
}
MAX_SPARSITY = 0.99
MAX_TOKENS = 4096  # most rows of X a timed layer gets (the real text yields ~11k token rows)
MAX_REPEAT = 200


def parse_block(text: str) -> tuple[int, int]:
    """'32x1' -> (32, 1): bs_r (rows of W, i.e. output features) x bs_c (input features)."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX*]\s*(\d{1,6})\s*", str(text))  # 6 digits: no int() of a huge string
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise UserError(f"block must look like 32x1 (bs_r x bs_c, both >= 1), got {str(text)[:40]!r}")
    return int(m[1]), int(m[2])


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M consecutive weights along the input dimension."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*:\s*(\d{1,6})\s*", str(text))
    if not m:
        raise UserError(f"N:M must look like 2:4, got {str(text)[:40]!r}")
    n, mm = int(m[1]), int(m[2])
    if not 1 <= n < mm:
        raise UserError(f"N:M needs 1 <= N < M, got {n}:{mm}")
    return n, mm


def parse_floats(text: str) -> list[float]:
    """'0.5,0.9' -> [0.5, 0.9] (a flag's comma-separated numbers)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers like 0.5,0.9, got {text!r}") from None


def fmt_block(block: tuple[int, int]) -> str:
    return f"{block[0]}x{block[1]}"


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One experiment. Frozen and hashable: once resolved it is the cache key (with the machine)."""

    model: str = "minilm-l6"  # catalog name, see model.catalog.MODEL_NAMES
    layer: str = "encoder.layer.0.attention.self.query"  # dotted name of an nn.Linear
    method: str = "block"  # prune.methods.METHODS: magnitude | block | nm | random | wanda | sparsegpt
    block: tuple[int, int] = (32, 1)  # (bs_r, bs_c): rows of W (outputs) x columns (inputs)
    sparsity: float = 0.9  # target fraction of weights removed, in [0, 0.99]
    nm: tuple[int, int] | None = None  # (N, M): keep N of every M inputs; method nm, or random
    norm: str = "l2"  # block score: l1 or l2 norm of the tile (method block only)
    tokens: int = 128  # rows of X: real calibration tokens fed to the layer
    seed: int = 0  # random pruning's seed; sparsegpt's calibration draw
    threads: int = 0  # threads for every kernel; 0 = all cores
    repeat: int = 25  # timed samples per implementation (more: a steadier median)
    precision: str = "fp32"  # PRECISIONS: the kept weights (and the activations) as the kernel computes them

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: block "32x1", nm "2:4" or None (and `from_dict` reads it back)."""
        return {**dataclasses.asdict(self), "block": fmt_block(self.block),
                "nm": None if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Spec":
        return cls(**{**d, "block": parse_block(d["block"]), "nm": None if d["nm"] is None else parse_nm(d["nm"])})

    def check_shape(self, shape: tuple[int, int]) -> None:
        """Raise UserError unless the block (or N:M group) tiles a weight of `shape` (out, in)."""
        out_f, in_f = shape
        bs_r, bs_c = self.block
        if out_f % bs_r:
            raise UserError(f"block {fmt_block(self.block)} does not divide layer {self.layer} {out_f}x{in_f}: "
                            f"bs_r={bs_r} must divide the output dimension {out_f}")
        if in_f % bs_c:
            raise UserError(f"block {fmt_block(self.block)} does not divide layer {self.layer} {out_f}x{in_f}: "
                            f"bs_c={bs_c} must divide the input dimension {in_f}")
        if self.nm is not None and in_f % self.nm[1]:
            raise UserError(f"N:M {self.nm[0]}:{self.nm[1]} does not fit layer {self.layer}: "
                            f"M={self.nm[1]} must divide the input dimension {in_f}")

    def label(self) -> str:
        """Short name of the pattern, e.g. 'block 32x1', 'nm 2:4', 'magnitude', 'block 16x4 int8'."""
        precision = "" if self.precision == "fp32" else f" {self.precision}"
        return self._pattern_label() + precision

    def _pattern_label(self) -> str:
        if self.nm is not None:
            seed = f" seed {self.seed}" if self.seed else ""  # canonical: 0 unless the method draws
            return f"{self.method} {self.nm[0]}:{self.nm[1]}{seed}"
        if self.method == "wanda" and self.block == (1, 1):
            return "wanda"
        if self.method == "magnitude":
            return "magnitude"
        seed = f" seed {self.seed}" if self.seed else ""  # canonical: 0 unless the method draws
        norm = f" {self.norm}" if self.method in ("block", "wanda") and self.norm != "l2" else ""
        return f"{self.method} {fmt_block(self.block)}{norm}{seed}"


# The model level ------------------------------------------------------------------------------------

ROLES = {  # role name -> the BERT sublayers it covers (overrides may name a role instead of a layer glob)
    "q": ("attention.self.query",), "k": ("attention.self.key",), "v": ("attention.self.value",),
    "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attention-output": ("attention.output.dense",),
    "ffn-in": ("intermediate.dense",), "ffn-out": ("output.dense",),
}
MAX_BATCH, MAX_SEQ = 8, 512  # batch * tokens rows stay within a single layer's MAX_TOKENS (4096)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """Prune a whole model: a default pattern for every encoder linear, then per-layer overrides.

    Frozen and hashable: once resolved it is the cache key of a model result (with the machine).
    An override is "TARGET=VALUE": TARGET a role (ROLES: q, k, v, qkv, attention-output, ffn-in,
    ffn-out) or a glob on the layer name (`attention.self.*`, `encoder.layer.0.*`); VALUE a
    sparsity (`0.7`), `dense` (the layer is not pruned), a block at a sparsity (`16x1@0.8`) or an
    N:M pattern (`2:4`). Overrides apply in order; the last that matches a layer wins.
    """

    model: str = "minilm-l6"  # catalog name, see model.catalog.MODEL_NAMES
    method: str = "block"  # default pattern's pruning method (prune.methods.METHODS)
    block: tuple[int, int] = (32, 1)  # default (bs_r, bs_c)
    sparsity: float = 0.9  # default fraction of each layer's weights removed
    nm: tuple[int, int] | None = None  # default N:M (method nm, or random N:M)
    norm: str = "l2"  # block score norm
    seed: int = 0  # random pruning's seed; sparsegpt's calibration draw
    overrides: tuple[str, ...] = ()  # "TARGET=VALUE" strings, applied in order
    tokens: int = 128  # sequence length (tokens per input)
    batch: int = 1  # inputs per call; the kernels see batch * tokens rows
    threads: int = 0  # threads for every implementation; 0 = all cores
    repeat: int = 25  # timed samples per implementation
    precision: str = "fp32"  # PRECISIONS: every linear's (a layer left dense too); the rest of the graph is fp32

    def _default_fields(self) -> dict[str, Any]:
        return dict(method=self.method, block=self.block, sparsity=self.sparsity, nm=self.nm, norm=self.norm,
                    seed=self.seed)

    def _layer_spec(self, layer: str, fields: dict[str, Any]) -> Spec:
        return Spec(model=self.model, layer=layer, tokens=self.batch * self.tokens, threads=self.threads,
                    repeat=self.repeat, precision=self.precision, **fields)

    def overrides_of(self, layer: str) -> list[str]:
        """The VALUEs of the overrides whose TARGET matches `layer`, in order (the last wins)."""
        return [value for target, value in (o.split("=", 1) for o in self.overrides) if _matches(target, layer)]

    def layer_spec(self, layer: str, fields: dict[str, Any]) -> Spec:
        """The single-layer Spec of `layer` with these pruning fields (method, block, sparsity, nm, norm, seed)."""
        return self._layer_spec(layer, fields)

    def default_fields(self) -> dict[str, Any]:
        """The default pattern's pruning fields."""
        return self._default_fields()

    def default_pattern(self) -> Spec:
        """The plan's default pattern as a Spec of its first layer (unresolved)."""
        return self._layer_spec("encoder.layer.0.attention.self.query", self._default_fields())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: block "32x1", nm "2:4" or None, overrides a list (and `from_dict` reads it back)."""
        return {**dataclasses.asdict(self), "block": fmt_block(self.block),
                "nm": None if self.nm is None else f"{self.nm[0]}:{self.nm[1]}", "overrides": list(self.overrides)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelPlan":
        p = {k: v for k, v in d.items() if k != "label"}
        return cls(**{**p, "block": parse_block(p["block"]), "nm": None if p["nm"] is None else parse_nm(p["nm"]),
                      "overrides": tuple(p["overrides"])})

    def label(self) -> str:
        pattern = self._layer_spec("", self._default_fields()).label()
        at = "" if self.nm is not None else f" at {self.sparsity:g}"
        extra = f", {len(self.overrides)} override(s)" if self.overrides else ""
        return f"{pattern}{at}{extra}"


def _matches(target: str, layer: str) -> bool:
    if target in ROLES:  # the sublayer after "encoder.layer.N.", exactly (output.dense is not attention.output.dense)
        return re.sub(r"^encoder\.layer\.\d+\.", "", layer) in ROLES[target]
    return fnmatch.fnmatchcase(layer, target) or fnmatch.fnmatchcase(layer, "*." + target)


def canonical_override(text: str) -> str:
    """Check one "TARGET=VALUE" override; returns it stripped. UserError says what is wrong."""
    target, sep, value = str(text).partition("=")
    target, value = target.strip(), value.strip()
    if not sep or not target or not value:
        raise UserError(f"an override must look like 'attention.self.*=0.7' or 'ffn-in=dense', got {text!r}")
    if any(c in target for c in "/\\") or target.startswith("."):
        raise UserError(f"override target {target!r} must be a role ({', '.join(ROLES)}) or a layer-name glob")
    try:
        if value != "dense":
            if ":" in value:
                parse_nm(value)
            elif "@" in value:
                block, sparsity = value.split("@", 1)
                parse_block(block)
                check_sparsity(float(sparsity))
            else:
                check_sparsity(float(value))
    except ValueError as e:
        raise UserError(f"override {text!r}: the value must be a sparsity (0.7), 'dense', a block at a sparsity "
                        f"(16x1@0.8) or an N:M pattern (2:4); {e}") from None
    return f"{target}={value}"


def check_sparsity(s: float) -> None:
    if not 0.0 <= s <= MAX_SPARSITY:
        raise UserError(f"sparsity must be in [0, {MAX_SPARSITY}], got {s}")


def plan_to_command(plan: ModelPlan, command: str = "model") -> str:
    """The CLI line that runs `plan`: `python -m sparsity_app model --model ... --override ...` (shell-quoted)."""
    args = ["python", "-m", "sparsity_app", command, "--model", plan.model, "--method", plan.method,
            "--block", fmt_block(plan.block), "--sparsity", f"{plan.sparsity:g}"]
    if plan.nm is not None:
        args += ["--nm", f"{plan.nm[0]}:{plan.nm[1]}"]
    if plan.norm != "l2":
        args += ["--norm", plan.norm]
    if plan.seed:
        args += ["--seed", str(plan.seed)]
    for override in plan.overrides:
        args += ["--override", override]
    args += ["--tokens", str(plan.tokens), "--batch", str(plan.batch), "--threads", str(plan.threads),
             "--repeat", str(plan.repeat)]
    return " ".join(shlex.quote(a) for a in args)


# Recovery fine-tuning ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RecoveryRequest:
    """One recovery run. Frozen and hashable: resolved, it is the cache key (with the machine)."""

    plan: ModelPlan = ModelPlan()  # the pattern to recover (its tokens/batch/repeat are for timing only)
    recipe: str = "fixed"  # accuracy.recipes.RECIPES
    steps: int = 300  # optimiser steps
    batch: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # AdamW learning rate (cosine decay to 0 after a 5% warm-up); chosen by `bench-recovery --probe-lr`
    seed: int = 0  # data order
    decay_fraction: float = 2 / 3  # gradual / mask-decay / structure-decay / group-lasso: steps spent before the final mask
    mask_interval: int = 10  # gradual / mask-decay: steps between mask updates
    beta_schedule: str = "linear"  # mask-decay: linear | exponential
    sr_ste_decay: float = 2e-4  # sr-ste: decay on the pruned weights (lambda_w of Zhou et al.)
    # group-lasso: weight of the summed block L2 norms in the loss. The smallest tried by the fidelity probe
    # (`bench-recovery --probe-group-lasso`, 32x1 at 50%, 100 steps): 2e-6 0.610, 2e-5 0.534, 2e-4 0.492,
    # 2e-3 0.321. Fidelity prefers ever smaller ones: the penalty is the phase's only force (README).
    group_lasso: float = 2e-6
    loss: str = "hidden"  # accuracy.recipes.LOSSES: what of the dense model the student learns to reproduce
    lengths: str = "mixed"  # accuracy.recipes.LENGTHS: the sequence lengths a step's batch x seq_len tokens are cut into
    checkpoint_every: int = 25  # steps between checkpoints

    def label(self) -> str:
        return f"{self.plan.label()}, {self.recipe}, {self.steps} steps"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecoveryRequest":
        # stored before `lengths` existed: every sequence was seq_len tokens long
        return cls(**{"lengths": "fixed", **d, "plan": ModelPlan.from_dict(d["plan"])})

    def key(self, machine: dict) -> str:
        """Everything that changes the recovered weights and their scores: the resolved request, the
        machine and packages, and the code that trains and scores (`machine["code"]`: runs.recover.recovery_machine,
        whose code is the hash of the training and scoring sources, not the kernels')."""
        blob = json.dumps({"recovery": self.to_dict(), "machine": machine}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


# Resolved requests ------------------------------------------------------------------------------
# What a door hands down after `runs.resolve` checked a request once: everything below takes these and
# never validates again. Built by runs.resolve only (and read back from their own serialised form).

@dataclasses.dataclass(frozen=True)
class ResolvedSpec:
    """A Spec in its canonical form, checked against its layer."""

    spec: Spec  # canonical (fields its method ignores at fixed values)
    shape: tuple[int, int]  # (out, in) of the layer


@dataclasses.dataclass(frozen=True)
class ResolvedPlan:
    """A ModelPlan in its canonical form, with every prunable linear's pattern."""

    plan: ModelPlan  # canonical
    layers: tuple[tuple[str, Spec | None], ...]  # each prunable linear in model order: its canonical Spec, None = dense

    @property
    def specs(self) -> dict[str, Spec | None]:
        return dict(self.layers)

    def with_timing(self, tokens: int, batch: int, threads: int, repeat: int) -> "ResolvedPlan":
        """The same pruning timed otherwise (valid timing fields; threads resolved, >= 1): nothing to validate again."""
        layers = tuple((name, None if s is None else dataclasses.replace(s, tokens=batch * tokens, threads=threads,
                                                                         repeat=repeat)) for name, s in self.layers)
        return ResolvedPlan(dataclasses.replace(self.plan, tokens=tokens, batch=batch, threads=threads, repeat=repeat),
                            layers)

    def to_dict(self) -> dict[str, Any]:
        """The one serialised form of a resolved plan (jobs carry it; `from_dict` reads it back unvalidated)."""
        return {"plan": self.plan.to_dict(), "layers": [[name, None if s is None else s.to_dict()]
                                                        for name, s in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResolvedPlan":
        return cls(plan=ModelPlan.from_dict(d["plan"]),
                   layers=tuple((name, None if s is None else Spec.from_dict(s)) for name, s in d["layers"]))


@dataclasses.dataclass(frozen=True)
class ResolvedRecovery:
    """A RecoveryRequest in its canonical form (knobs its recipe ignores at fixed values), with its plan's layers."""

    request: RecoveryRequest  # canonical; request.plan == plan.plan
    plan: ResolvedPlan

    def to_dict(self) -> dict[str, Any]:
        return {"request": self.request.to_dict(), "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResolvedRecovery":
        return cls(request=RecoveryRequest.from_dict(d["request"]), plan=ResolvedPlan.from_dict(d["plan"]))
