"""Per-layer sensitivity (prune one layer at a time) and a sensitivity-guided per-layer allocation.

run_sensitivity(request) -> SensitivityResult: for every (layer, sparsity) of the request's grid,
the model with that one layer pruned (a copy; every other layer dense) is scored on the real-label
metrics (metrics.evaluate: Lee Pearson, polarity probe, WordSim, SimLex, embedding cosine vs
dense), and the layer's sparse kernel is timed against its dense peers (runs.layer.run, at
batch * tokens rows). Each point lands in the Store as soon as it is measured (namespace
`sensitivity` for the metrics; the layer results and tuned schedules where runs.layer.run keeps
them), so a killed run resumes where it stopped and a repeated run is instant.

allocate(result, ...) -> Allocation: per-layer sparsities, chosen from the measured grid (or dense),
that lose the least accuracy for a target overall sparsity (by weight count) or a target latency.
Model of the loss: the sum of the per-layer losses (dense metric - metric with only that layer
pruned); interactions between layers are ignored, so the whole-model mode's measured metric is
the figure to trust. Model of the latency: the sum of the layers' single-layer kernel medians (a
layer left dense costs its TVM dense kernel) plus a fixed remainder (everything but the linears,
from a stored whole-model breakdown when one exists). The choice is exact under these models: a
dynamic programme over the Pareto front of (cost, loss), so no allocation with the same or a
smaller cost (kept weights, or ms) on this grid has a smaller summed loss.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from sparsity_app.accuracy import metrics
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ModelPlan, ResolvedSpec, Spec, fmt_block, parse_block, parse_nm, plan_to_command
from sparsity_app.core.results import DENSE_PEERS, SPARSE
from sparsity_app.measure.timing import fingerprint
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import pruned_layer
from sparsity_app.runs import resolve
from sparsity_app.runs.layer import lookup as lookup_layer, run as run_layer
from sparsity_app.runs.pipeline import Progress, quiet

DENSE_COST_PEER = "tvm_dense"  # what a layer left dense costs in the latency model (the graph runs our dense GEMM)
POINT_FORMAT = 1  # part of every point's key: bump when how a point is computed changes (this file is not hashed)
MAX_FRONT = 20_000  # Pareto states kept per layer of the allocation (thinned by cost beyond it)


def loss_metrics() -> list[str]:
    """The metrics a layer's loss is measured in (metrics.METRICS, the higher-is-better ones: loss = dense - pruned)."""
    return [name for name, metric in metrics.METRICS.items() if metric.higher_is_better]


@dataclasses.dataclass(frozen=True)
class SensitivityRequest:
    """Prune each layer alone at each sparsity of a grid. Frozen; resolved, its points are cache keys."""

    model: str = "minilm-l6"  # catalog name, see model.catalog.MODEL_NAMES
    method: str = "block"  # pruning method of every point (prune.methods.METHODS)
    block: tuple[int, int] = (32, 1)  # (bs_r, bs_c)
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)  # the grid; an N:M pattern has one sparsity, 1 - N/M
    nm: tuple[int, int] | None = None  # (N, M) for method nm (or random / wanda N:M)
    norm: str = "l2"  # block score norm
    seed: int = 0  # random pruning's seed
    layers: tuple[str, ...] = ()  # layers to measure; () = every prunable linear of the model
    tokens: int = 128  # sequence length of the whole model the allocation is for
    batch: int = 1  # sequences per call: kernels are timed at batch * tokens rows
    threads: int = 0  # threads for every kernel; 0 = all cores
    repeat: int = 25  # timed samples per implementation
    time_kernels: bool = True  # False: metrics only (no latency allocation possible)
    resolved: bool = dataclasses.field(default=False, compare=False)  # set by `resolve()` alone

    def resolve(self) -> "SensitivityRequest":
        """Validate every point (cheap: no weights); canonical sparsities and layers. UserError says what to fix.

        The door (CLI, page) resolves; a resolved request returns itself, so the runs below it never check again.
        """
        if self.resolved:
            return self
        model = get_model(self.model)
        known = [info.name for info in model.layers()]
        layers = tuple(self.layers) or tuple(known)
        for name in layers:
            if name not in known:
                raise UserError(f"unknown layer {name!r} for model {self.model}; valid layers: {', '.join(known[:6])}, "
                                f"... ({len(known)} in all; see `layers --model {self.model}`)")
        if len(set(layers)) != len(layers):
            raise UserError("each layer may be named once")
        if not self.sparsities and self.nm is None:
            raise UserError("give at least one sparsity, e.g. --sparsities 0.5,0.7,0.9")
        plan = resolve.plan_fields(ModelPlan(  # batch, tokens, threads and the pattern checked once
            model=self.model, method=self.method, block=self.block, sparsity=0.5, nm=self.nm, norm=self.norm,
            seed=self.seed, tokens=self.tokens, batch=self.batch, threads=self.threads, repeat=self.repeat))
        specs = [self._spec(plan, layers[0], s) for s in (self.sparsities or (0.5,))]
        sparsities = tuple(sorted({s.sparsity for s in specs}))
        if any(s == 0 for s in sparsities):
            raise UserError("sparsity 0 is the dense model itself; give sparsities above 0")
        return dataclasses.replace(self, method=plan.method, block=plan.block, nm=plan.nm, norm=plan.norm,
                                   seed=plan.seed, threads=plan.threads, sparsities=sparsities, layers=layers,
                                   resolved=True)

    def _spec(self, plan: ModelPlan, layer: str, sparsity: float) -> Spec:
        spec = resolve.spec(Spec(model=self.model, layer=layer, method=plan.method, block=plan.block, sparsity=sparsity,
                                 nm=plan.nm, norm=plan.norm, seed=plan.seed, tokens=self.batch * self.tokens,
                                 threads=plan.threads, repeat=self.repeat))
        spec.check_shape(dict((i.name, i.shape) for i in get_model(self.model).layers())[layer])
        return spec

    def points(self) -> list[Spec]:
        """The resolved single-layer Spec of every point, layer by layer (call on a resolved request)."""
        plan = self.plan(0.5)
        return [self._spec(plan, layer, s) for layer in self.layers for s in self.sparsities]

    def plan(self, sparsity: float, overrides: tuple[str, ...] = ()) -> ModelPlan:
        """The whole-model plan with this request's pattern at `sparsity`, and `overrides`."""
        return ModelPlan(model=self.model, method=self.method, block=self.block, sparsity=sparsity, nm=self.nm,
                         norm=self.norm, seed=self.seed, overrides=overrides, tokens=self.tokens, batch=self.batch,
                         threads=self.threads, repeat=self.repeat)

    def label(self) -> str:
        return self.plan(0.5).label().rsplit(" at ", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "resolved"}
        return {**fields, "block": fmt_block(self.block),
                "nm": None if self.nm is None else f"{self.nm[0]}:{self.nm[1]}", "sparsities": list(self.sparsities),
                "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensitivityRequest":
        return cls(**{**d, "block": parse_block(d["block"]), "nm": None if d["nm"] is None else parse_nm(d["nm"]),
                      "sparsities": tuple(d["sparsities"]), "layers": tuple(d["layers"])})


@dataclasses.dataclass(frozen=True)
class SensitivityPoint:
    """One layer pruned alone at one sparsity, every other layer dense."""

    layer: str  # dotted name of the nn.Linear
    shape: tuple[int, int]  # (out, in) of its weight
    sparsity: float  # the target (resolved)
    sparsity_achieved: float  # fraction of the layer's weights the mask removes
    metrics: dict[str, float | None]  # metrics.METRICS of the model with this layer pruned (None: synthetic weights)
    times_ms: dict[str, float] | None  # median kernel ms: SPARSE and the DENSE_PEERS, one measure call; None = not timed
    cached: bool = False  # the metrics came from the store

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def kept(self) -> int:
        """Weights the layer keeps at this point."""
        return int(round(self.weights * (1.0 - self.sparsity_achieved)))

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "shape": list(self.shape), "sparsity": self.sparsity,
                "sparsity_achieved": self.sparsity_achieved, "metrics": dict(self.metrics),
                "times_ms": None if self.times_ms is None else dict(self.times_ms), "cached": self.cached}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensitivityPoint":
        return cls(layer=d["layer"], shape=tuple(d["shape"]), sparsity=d["sparsity"],
                   sparsity_achieved=d["sparsity_achieved"], metrics=d["metrics"], times_ms=d["times_ms"],
                   cached=d.get("cached", False))


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    """Every point of a request (layers x sparsities, layer-major) and the dense model's metrics."""

    request: SensitivityRequest  # resolved
    points: list[SensitivityPoint]
    dense_metrics: dict[str, float | None]  # metrics.METRICS of the unpruned model
    real_weights: bool = True  # False: the accuracy figures mean nothing (synthetic weights)

    @property
    def cached(self) -> bool:
        return all(p.cached for p in self.points)

    def loss(self, point: SensitivityPoint, metric: str) -> float | None:
        """dense metric - metric with this layer pruned (higher = more sensitive); None without real weights."""
        value, dense = point.metrics.get(metric), self.dense_metrics.get(metric)
        return None if value is None or dense is None else float(dense - value)

    def dense_ms(self, layer: str) -> float | None:
        """The layer's dense kernel median (DENSE_COST_PEER), over its timed points; None if untimed."""
        times = [p.times_ms[DENSE_COST_PEER] for p in self.points if p.layer == layer and p.times_ms]
        return float(np.median(times)) if times else None

    def to_dict(self) -> dict[str, Any]:
        return {"request": self.request.to_dict(), "label": self.request.label(),
                "points": [p.to_dict() for p in self.points], "dense_metrics": dict(self.dense_metrics),
                "real_weights": self.real_weights, "cached": self.cached,
                "accuracy_note": None if self.real_weights else
                "synthetic random weights: the accuracy figures mean nothing (timing only)"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensitivityResult":
        return cls(request=SensitivityRequest.from_dict(d["request"]),
                   points=[SensitivityPoint.from_dict(p) for p in d["points"]], dense_metrics=d["dense_metrics"],
                   real_weights=d.get("real_weights", True))


def point_key(spec: Spec, machine: dict) -> str:
    """The metrics of a point depend on the mask (not on tokens, threads or repeat) and on the machine's code."""
    mask_fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("tokens", "threads", "repeat")}
    blob = json.dumps({"sensitivity": mask_fields, "format": POINT_FORMAT, "machine": machine}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_sensitivity(request: SensitivityRequest, store=None, progress: Progress = quiet) -> SensitivityResult:
    """Measure every point of the request; stored points are read back, new ones stored as they finish.

    progress is told ("i/N", detail) before each point's evaluation and timing.
    """
    request = request.resolve()
    model, machine = get_model(request.model), fingerprint()
    specs = request.points()
    dense = _dense_metrics(request.model, store)
    shapes = {info.name: info.shape for info in model.layers()}
    points = []
    for i, spec in enumerate(specs, 1):
        step, where = f"{i}/{len(specs)}", f"{spec.layer} at {spec.sparsity:g}"
        key = point_key(spec, machine)
        stored = store.get_sensitivity_point(key) if store is not None else None
        if stored is not None:
            point = dataclasses.replace(SensitivityPoint.from_dict(stored), cached=True)
        else:
            progress(step, f"{where}: real-label metrics with only this layer pruned")
            point = _evaluate_point(spec, shapes[spec.layer])
        times = point.times_ms
        if request.time_kernels and times is None:
            resolved = ResolvedSpec(spec, shapes[spec.layer])  # `points()` resolved it
            cached = store is not None and lookup_layer(resolved, store) is not None
            progress(step, f"{where}: {'stored' if cached else 'timing'} sparse kernel vs dense peers "
                           f"({spec.tokens} rows)")
            result = run_layer(resolved, store=store, progress=lambda s, d: None)
            times = {name: t.median for name, t in result.times_ms.items() if name == SPARSE or name in DENSE_PEERS}
            point = dataclasses.replace(point, times_ms=times)
        if store is not None and (stored is None or point.times_ms != stored.get("times_ms")):
            store.put_sensitivity_point(key, dataclasses.replace(point, cached=False).to_dict())
        points.append(point)
    return SensitivityResult(request=request, points=points, dense_metrics=dense, real_weights=model.real_weights)


def lookup(request: SensitivityRequest, store) -> SensitivityResult | None:
    """The whole result if every point is stored (timed too, when the request times kernels); never computes."""
    request = request.resolve()
    machine, points = fingerprint(), []
    for spec in request.points():
        stored = store.get_sensitivity_point(point_key(spec, machine))
        if stored is None or (request.time_kernels and stored.get("times_ms") is None):
            return None
        points.append(dataclasses.replace(SensitivityPoint.from_dict(stored), cached=True))
    model = get_model(request.model)
    return SensitivityResult(request=request, points=points, dense_metrics=_dense_metrics(request.model, store),
                             real_weights=model.real_weights)


def _dense_metrics(model_name: str, store=None) -> dict[str, float | None]:
    """metrics.dense_metrics, kept in the store too (a fresh process would otherwise embed every text again)."""
    if not get_model(model_name).real_weights:
        return {name: None for name in metrics.METRICS}
    key = hashlib.sha256(json.dumps({"dense_metrics": model_name, "format": POINT_FORMAT, "machine": fingerprint()},
                                    sort_keys=True).encode()).hexdigest()
    stored = store.get_sensitivity_point(key) if store is not None else None
    if stored is not None:
        return stored
    dense = dict(metrics.dense_metrics(model_name))
    if store is not None:
        store.put_sensitivity_point(key, dense)
    return dense


def _evaluate_point(spec: Spec, shape: tuple[int, int]) -> SensitivityPoint:
    """The model with spec.layer pruned alone (a copy), scored on every real-label metric."""
    model = get_model(spec.model)
    mask, kept = pruned_layer(spec)  # kept: float32 [out, in], W * mask or reconstructed
    if model.real_weights:
        pruned = model.pruned_copy({spec.layer: kept})
        scores = metrics.evaluate(pruned, model.tokenizer(), metrics.reference_embeddings(spec.model))
    else:
        scores = {name: None for name in metrics.METRICS}
    return SensitivityPoint(layer=spec.layer, shape=tuple(shape), sparsity=spec.sparsity,
                            sparsity_achieved=1.0 - float(mask.mean()), metrics=scores, times_ms=None)


# ---- ranking and allocation ------------------------------------------------------------------------

def ranking(result: SensitivityResult, metric: str = "lee_pearson") -> list[dict[str, Any]]:
    """One row per layer, most sensitive first: loss at the grid's highest sparsity, mean loss over the
    grid, and the kernel ms saved there (dense - sparse). Rows: layer, shape, loss_at_max, mean_loss,
    sparse_ms, dense_ms, saved_ms."""
    _check_metric(result, metric)
    top = max(result.request.sparsities)
    rows = []
    for layer in result.request.layers:
        mine = [p for p in result.points if p.layer == layer]
        at_top = next(p for p in mine if p.sparsity == top)
        losses = [result.loss(p, metric) for p in mine]
        dense_ms = result.dense_ms(layer)
        sparse_ms = at_top.times_ms[SPARSE] if at_top.times_ms else None
        rows.append({"layer": layer, "shape": f"{at_top.shape[0]}x{at_top.shape[1]}", "sparsity": top,
                     "loss_at_max": result.loss(at_top, metric), "mean_loss": float(np.mean(losses)),
                     "sparse_ms": sparse_ms, "dense_ms": dense_ms,
                     "saved_ms": None if sparse_ms is None or dense_ms is None else dense_ms - sparse_ms})
    rows.sort(key=lambda r: (-r["loss_at_max"], -r["mean_loss"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Per-layer sparsities for a target, and the plan that runs them."""

    target: str  # "sparsity" (overall, by weight count, over the request's layers) or "latency_ms"
    value: float  # the target
    metric: str  # the metric whose summed per-layer loss is minimised
    choices: dict[str, float | None]  # layer -> chosen target sparsity; None = left dense
    sparsity: float  # removed weights / all weights of the request's layers, at the chosen points
    predicted_loss: float  # sum of the chosen points' losses (the additive model)
    predicted_ms: float | None  # sum of the layers' kernel medians + remainder_ms; None if untimed
    remainder_ms: float | None  # everything but the linears, per pass (None: unknown, not counted)
    plan: ModelPlan  # resolved; run it with runs.model.run_model
    note: str = ""  # what the prediction leaves out

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "value": self.value, "metric": self.metric, "choices": dict(self.choices),
                "sparsity": self.sparsity, "predicted_loss": self.predicted_loss, "predicted_ms": self.predicted_ms,
                "remainder_ms": self.remainder_ms, "overrides": list(self.plan.overrides),
                "plan_label": self.plan.label(), "command": plan_to_command(self.plan), "note": self.note}


def allocate(result: SensitivityResult, target_sparsity: float | None = None, target_latency_ms: float | None = None,
             metric: str = "lee_pearson", remainder_ms: float | None = None) -> Allocation:
    """Per-layer sparsities from the measured grid (or dense) with the least summed loss of `metric` that
    reach `target_sparsity` (removed weights / all weights of the request's layers) or stay within
    `target_latency_ms` (sum of kernel medians + remainder_ms). Exactly one target. Layers the request
    did not measure are left dense in the plan."""
    if (target_sparsity is None) == (target_latency_ms is None):
        raise UserError("give exactly one target: a sparsity (--target-sparsity) or a latency (--target-latency-ms)")
    _check_metric(result, metric)
    request = result.request
    by_layer = collections.defaultdict(list)
    for p in result.points:
        by_layer[p.layer].append(p)
    weights = {layer: pts[0].weights for layer, pts in by_layer.items()}
    total = sum(weights.values())
    if target_sparsity is not None:
        if not 0.0 < target_sparsity < 1.0:
            raise UserError(f"target sparsity must be in (0, 1), got {target_sparsity}")
        budget = (1.0 - target_sparsity) * total + 0.5  # kept weights; half a weight for rounding
        cost = {layer: {None: weights[layer], **{p.sparsity: p.kept for p in pts}} for layer, pts in by_layer.items()}
        kind, value = "sparsity", float(target_sparsity)
    else:
        if any(p.times_ms is None for p in result.points):
            raise UserError("a latency target needs timed kernels: run the sensitivity without --no-time")
        cost = {layer: {None: result.dense_ms(layer), **{p.sparsity: p.times_ms[SPARSE] for p in pts}}
                for layer, pts in by_layer.items()}
        budget = float(target_latency_ms) - (remainder_ms or 0.0) - _unmeasured_dense_ms(result)
        kind, value = "latency_ms", float(target_latency_ms)
    loss = {layer: {None: 0.0, **{p.sparsity: result.loss(p, metric) for p in pts}} for layer, pts in by_layer.items()}
    layers = list(by_layer)
    choice = _min_loss_within(layers, cost, loss, budget)
    if choice is None:
        cheapest = sum(min(c.values()) for c in cost.values())
        if kind == "sparsity":
            raise UserError(f"target sparsity {value:g} is out of reach: the grid's sparsest points remove "
                            f"{1 - cheapest / total:.3f} of the weights (add a higher sparsity to the grid)")
        raise UserError(f"target latency {value:g} ms is out of reach: the grid's fastest points take "
                        f"{cheapest + (remainder_ms or 0.0) + _unmeasured_dense_ms(result):.3f} ms (kernels{' + remainder' if remainder_ms else ''})")
    choices = dict(zip(layers, choice))
    kept = sum(_kept_at(by_layer[layer], s) for layer, s in choices.items())
    timed = all(p.times_ms for p in result.points)
    predicted_ms = None
    if timed:
        predicted_ms = sum(result.dense_ms(layer) if s is None else
                           next(p.times_ms[SPARSE] for p in by_layer[layer] if p.sparsity == s)
                           for layer, s in choices.items()) + (remainder_ms or 0.0) + _unmeasured_dense_ms(result)
    note = ("loss: the sum of single-layer losses (interactions ignored; run the plan to measure it); latency: "
            "single-layer kernel medians (a dense layer: TVM dense; a layer not measured: the dense median of its shape)")
    note += "" if remainder_ms is not None else " -- the rest of the pass (attention, layer norm, GELU) is not counted"
    return Allocation(target=kind, value=value, metric=metric, choices=choices, sparsity=1.0 - kept / total,
                      predicted_loss=float(sum(loss[layer][s] for layer, s in choices.items())),
                      predicted_ms=predicted_ms, remainder_ms=remainder_ms,
                      plan=plan_of(request, choices), note=note)


def _unmeasured_dense_ms(result: SensitivityResult) -> float:
    """ms of the layers the request did not measure (they stay dense): each costs the median dense kernel
    time of the measured layers of its shape. UserError if a shape was not measured at all."""
    measured = set(result.request.layers)
    by_shape = collections.defaultdict(list)
    for layer in measured:
        ms = result.dense_ms(layer)
        if ms is not None:
            by_shape[next(p.shape for p in result.points if p.layer == layer)].append(ms)
    total = 0.0
    for info in get_model(result.request.model).layers():
        if info.name in measured:
            continue
        if not by_shape.get(tuple(info.shape)):
            raise UserError(f"a latency target needs a measured layer of every shape: no {info.shape[0]}x"
                            f"{info.shape[1]} layer was timed (add one to --layers, or measure every layer)")
        total += float(np.median(by_shape[tuple(info.shape)]))
    return total


def _kept_at(points: list[SensitivityPoint], sparsity: float | None) -> int:
    """Kept weights of a layer at a chosen sparsity (None = dense)."""
    if sparsity is None:
        return points[0].weights
    return next(p.kept for p in points if p.sparsity == sparsity)


def _min_loss_within(layers: list[str], cost: dict, loss: dict, budget: float) -> tuple | None:
    """The choice per layer (a key of cost[layer]) of least summed loss with summed cost <= budget, or None.

    A dynamic programme over the Pareto front of (cost, loss): after each layer only the states that no
    other state beats on both cost and loss survive. Exact (up to MAX_FRONT states per layer).
    """
    front: list[tuple[float, float, tuple]] = [(0.0, 0.0, ())]
    for layer in layers:
        grown = [(c + oc, l + loss[layer][k], ks + (k,)) for c, l, ks in front
                 for k, oc in cost[layer].items() if c + oc <= budget]
        grown.sort(key=lambda s: (s[0], s[1]))
        front, best = [], float("inf")
        for state in grown:
            if state[1] < best - 1e-12:
                front.append(state)
                best = state[1]
        if len(front) > MAX_FRONT:  # keep the front's extremes and an even spread in between
            idx = np.unique(np.linspace(0, len(front) - 1, MAX_FRONT).round().astype(int))
            front = [front[i] for i in idx]
        if not front:
            return None
    best_state = min(front, key=lambda s: (s[1], s[0]))
    return best_state[2]


def plan_of(request: SensitivityRequest, choices: dict[str, float | None]) -> ModelPlan:
    """The whole-model plan for per-layer choices (None = dense): the commonest choice is the default,
    every other layer an exact-name override; layers not in `choices` are left dense."""
    everything = [info.name for info in get_model(request.model).layers()]
    wanted = {layer: choices.get(layer) for layer in everything}
    default = collections.Counter(wanted.values()).most_common(1)[0][0]
    if request.nm is not None and default is None:
        default = request.sparsities[0]  # an N:M default always prunes; dense layers are overrides
    overrides = tuple(f"{layer}={_override_value(request, s)}" for layer, s in wanted.items() if s != default)
    plan = request.plan(0.0 if default is None else default, overrides)

    specs = resolve.plan(plan).specs
    for layer, s in wanted.items():  # the plan must mean exactly the choices
        got = None if specs[layer] is None else specs[layer].sparsity
        assert got == s, f"plan gives {layer} {got}, the allocation chose {s}"
    return plan


def _override_value(request: SensitivityRequest, sparsity: float | None) -> str:
    if sparsity is None:
        return "dense"
    if request.nm is not None:
        return f"{request.nm[0]}:{request.nm[1]}"
    return f"{sparsity:g}"


def _check_metric(result: SensitivityResult, metric: str) -> None:
    if metric not in loss_metrics():
        raise UserError(f"unknown metric {metric!r}; valid metrics: {', '.join(loss_metrics())}")
    if not result.real_weights:
        raise UserError(f"model {result.request.model} has synthetic weights: no accuracy to rank or allocate by")


def remainder_from_store(request: SensitivityRequest, store) -> float | None:
    """Per-pass ms of everything but the linears (TVM sparse breakdown) from a stored whole-model result
    of the same model, batch, tokens and threads; the median over such results; None if none is stored."""
    request = request.resolve()
    rests = [sum(r.breakdown[SPARSE].values()) - r.breakdown[SPARSE].get("linears", 0.0)
             for r in store.model_results(model=request.model)
             if (r.plan.batch, r.plan.tokens, r.plan.threads) == (request.batch, request.tokens, request.threads)
             and SPARSE in r.breakdown]
    return float(np.median(rests)) if rests else None


__all__ = ["SensitivityRequest", "SensitivityPoint", "SensitivityResult", "Allocation", "run_sensitivity", "lookup",
           "ranking", "allocate", "plan_of", "remainder_from_store", "UserError"]
