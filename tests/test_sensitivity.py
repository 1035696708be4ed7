"""Sensitivity: points stored as they finish, and an allocation that is optimal on its grid and runs as a plan."""
import itertools

import numpy as np
import pytest

from sparsity_app import UserError
from sparsity_app.core.store import Store
from sparsity_app.runs import resolve
from sparsity_app.runs.sensitivity import (SensitivityPoint, SensitivityRequest, SensitivityResult, allocate, lookup,
                                           plan_of, ranking, run_sensitivity)

LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
          "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense")


def _result(losses: dict[str, dict[float, float]], ms: dict[str, dict[float, float]] | None = None) -> SensitivityResult:
    """A hand-made result over real MiniLM layer names: losses[layer][sparsity] of lee_pearson (dense 0.6)."""
    from sparsity_app.model.catalog import get_model

    shapes = {i.name: i.shape for i in get_model("minilm-l6").layers()}
    sparsities = sorted({s for grid in losses.values() for s in grid})
    request = SensitivityRequest(layers=tuple(losses), sparsities=tuple(sparsities), time_kernels=ms is not None).resolve()
    points = [SensitivityPoint(layer, shapes[layer], s, s, {"lee_pearson": 0.6 - loss},
                               None if ms is None else {"tvm_sparse": ms[layer][s], "tvm_dense": ms[layer][0.0]})
              for layer, grid in losses.items() for s, loss in grid.items()]
    return SensitivityResult(request, points, {"lee_pearson": 0.6})


def _brute_force(result, budget_of, within) -> float:
    """Least summed loss over every combination of choices (None = dense) that meets the target."""
    layers = result.request.layers
    options = [[None, *result.request.sparsities] for _ in layers]
    best = float("inf")
    for combo in itertools.product(*options):
        cost = sum(budget_of(layer, s) for layer, s in zip(layers, combo))
        if within(cost):
            loss = sum(0.0 if s is None else next(result.loss(p, "lee_pearson") for p in result.points
                                                  if p.layer == layer and p.sparsity == s)
                       for layer, s in zip(layers, combo))
            best = min(best, loss)
    return best


RNG = np.random.default_rng(7)
LOSSES = {layer: dict(zip((0.5, 0.7, 0.9), np.sort(RNG.uniform(0, 0.05 * (i + 1), 3)))) for i, layer in enumerate(LAYERS)}
MS = {layer: {0.0: 1.0 + i, 0.5: 0.6 + i / 2, 0.7: 0.4 + i / 3, 0.9: 0.2 + i / 5} for i, layer in enumerate(LAYERS)}


@pytest.mark.parametrize("target", [0.3, 0.55, 0.7, 0.85])
def test_sparsity_allocation_is_the_best_combination_on_the_grid(target):
    result = _result(LOSSES)
    a = allocate(result, target_sparsity=target)
    assert a.sparsity >= target - 1e-9  # hits the target (by weight count)
    weights = {p.layer: p.weights for p in result.points}
    total = sum(weights.values())
    best = _brute_force(result, lambda layer, s: weights[layer] * (1 - (s or 0.0)),
                        lambda kept: kept <= (1 - target) * total + 0.5)
    assert a.predicted_loss == pytest.approx(best)  # no combination of the same or fewer kept weights loses less
    uniform = [s for s in (0.5, 0.7, 0.9) if s >= target]
    if uniform:  # never worse than pruning every layer alike at the same weight count or more
        assert a.predicted_loss <= sum(LOSSES[layer][uniform[0]] for layer in LAYERS) + 1e-12


def test_latency_allocation_is_the_best_combination_within_the_budget():
    from sparsity_app.runs.sensitivity import _unmeasured_dense_ms

    result = _result(LOSSES, MS)
    rest = _unmeasured_dense_ms(result)  # the 32 layers not measured stay dense: each its shape's dense median
    assert rest == pytest.approx(22 * 1.5 + 5 * 3.0 + 5 * 4.0)  # 384x384: the median of 1.0 and 2.0
    a = allocate(result, target_latency_ms=5.0 + rest, remainder_ms=1.0)
    assert a.predicted_ms <= 5.0 + rest + 1e-9
    best = _brute_force(result, lambda layer, s: MS[layer][s or 0.0], lambda ms: ms <= 4.0)
    assert a.predicted_loss == pytest.approx(best)
    with pytest.raises(UserError, match="out of reach"):
        allocate(result, target_latency_ms=1.5 + rest, remainder_ms=1.0)
    partial = _result({LAYERS[0]: LOSSES[LAYERS[0]]}, {LAYERS[0]: MS[LAYERS[0]]})
    with pytest.raises(UserError, match="every shape"):
        allocate(partial, target_latency_ms=100.0)


def test_a_sensitive_layer_is_spared_and_the_plan_means_the_choices():
    losses = {layer: {0.5: 0.001, 0.9: 0.002} for layer in LAYERS}
    losses[LAYERS[2]] = {0.5: 0.2, 0.9: 0.4}  # the FFN input layer: very sensitive
    result = _result(losses)
    assert ranking(result)[0]["layer"] == LAYERS[2]
    a = allocate(result, target_sparsity=0.5)
    assert a.choices[LAYERS[2]] is None and a.sparsity >= 0.5
    specs = resolve.plan(a.plan).specs  # every layer as chosen, those not measured left dense
    assert {name: None if s is None else s.sparsity for name, s in specs.items() if name in a.choices} == a.choices
    assert all(specs[name] is None for name in specs if name not in a.choices)
    with pytest.raises(UserError, match="out of reach"):
        allocate(result, target_sparsity=0.95)
    with pytest.raises(UserError, match="exactly one target"):
        allocate(result)
    with pytest.raises(UserError, match="valid metrics"):
        allocate(result, target_sparsity=0.5, metric="accuracy")


def test_plan_of_uses_the_commonest_choice_as_default():
    request = SensitivityRequest(sparsities=(0.5, 0.9)).resolve()
    choices = {layer: 0.9 for layer in request.layers}
    choices["encoder.layer.3.output.dense"] = None
    choices["encoder.layer.2.attention.self.query"] = 0.5
    plan = plan_of(request, choices)
    assert plan.sparsity == 0.9 and len(plan.overrides) == 2
    specs = resolve.plan(plan).specs
    assert specs["encoder.layer.3.output.dense"] is None
    assert specs["encoder.layer.2.attention.self.query"].sparsity == 0.5
    assert specs["encoder.layer.3.attention.output.dense"].sparsity == 0.9  # output.dense override hits only its layer


def test_points_land_in_the_store_and_a_rerun_reads_them(cache_dir):
    request = SensitivityRequest(layers=("encoder.layer.5.attention.self.value",), sparsities=(0.5, 0.95),
                                 time_kernels=False)
    store = Store(cache_dir)
    assert lookup(request, store) is None
    seen = []
    first = run_sensitivity(request, store=store, progress=lambda step, detail: seen.append(step))
    assert seen == ["1/2", "2/2"] and not first.cached
    dense = first.dense_metrics["lee_pearson"]
    at = {p.sparsity: p for p in first.points}
    assert at[0.95].sparsity_achieved == pytest.approx(0.95, abs=0.01)
    assert at[0.95].metrics["embedding_cosine"] < at[0.5].metrics["embedding_cosine"] < 1.0
    assert all(p.metrics["lee_pearson"] != dense for p in first.points)  # the layer really was pruned
    again = run_sensitivity(request, store=store, progress=lambda step, detail: seen.append(step))
    assert again.cached and len(seen) == 2 and [p.metrics for p in again.points] == [p.metrics for p in first.points]
    assert lookup(request, store).cached


def test_bad_requests_are_one_line_errors():
    with pytest.raises(UserError, match="unknown layer"):
        SensitivityRequest(layers=("encoder.layer.9.attention.self.query",)).resolve()
    with pytest.raises(UserError, match="sparsity"):
        SensitivityRequest(sparsities=(0.5, 1.5)).resolve()
    with pytest.raises(UserError, match="does not divide"):
        SensitivityRequest(block=(5, 1)).resolve()
    r = SensitivityRequest(method="nm", nm=(2, 4), sparsities=(0.3, 0.9)).resolve()
    assert r.sparsities == (0.5,)


def _store_fake_grid(cache_dir, request) -> None:
    """Every point of `request` in the store with made-up metrics and times (layer i loses i/1000 per 0.1 sparsity)."""
    from sparsity_app.measure.timing import fingerprint
    from sparsity_app.model.catalog import get_model
    from sparsity_app.runs.sensitivity import _dense_metrics, point_key

    shapes = {i.name: i.shape for i in get_model(request.model).layers()}
    store = Store(cache_dir)
    dense = _dense_metrics(request.model, store)  # stored too: the CLI's subprocesses read it back
    for spec in request.resolve().points():
        loss = (1 + sum(map(ord, spec.layer)) % 7) * spec.sparsity / 1000
        point = SensitivityPoint(spec.layer, shapes[spec.layer], spec.sparsity, spec.sparsity,
                                 {k: v - loss for k, v in dense.items()},
                                 {"tvm_sparse": 1 - spec.sparsity, "tvm_dense": 1.2, "torch_dense": 1.0})
        store.put_sensitivity_point(point_key(spec, fingerprint()), point.to_dict())
    store.close()


def test_allocate_cli_prints_the_plan_and_its_command(cli, cache_dir):
    import json

    request = SensitivityRequest(sparsities=(0.5, 0.7, 0.9))
    _store_fake_grid(cache_dir, request.resolve())
    run = cli(["allocate", "--target-sparsity", "0.8", "--json"])
    assert run.returncode == 0, run.stderr
    d = json.loads(run.stdout)
    assert d["sensitivity_cached"] and d["sparsity"] >= 0.8 and d["command"].startswith("python -m sparsity_app model")
    assert all("=" in o for o in d["overrides"])
    text = cli(["allocate", "--target-sparsity", "0.8"])
    assert text.returncode == 0 and "run it with:" in text.stdout and "--override" in text.stdout
    table = cli(["sensitivity"])
    assert table.returncode == 0 and "ranking by lee_pearson" in table.stdout and " 36. " in table.stdout
    for args, words in ((["allocate"], "exactly one target"), (["sensitivity", "--sparsities", "0.5,x"], "numbers"),
                        (["sensitivity", "--layers", "encoder.layer.9.x"], "unknown layer"),
                        (["allocate", "--target-sparsity", "0.99"], "out of reach")):
        bad = cli(args)
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert bad.returncode == 2 and len(errors) == 1 and words in errors[0] and "Traceback" not in bad.stderr, \
            (args, bad.stderr)


def test_export_cli_refuses_a_non_empty_directory(cli, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    bad = cli(["export", "--sparsity", "0.5", "--out", str(tmp_path / "out")])
    assert bad.returncode == 2 and "not empty" in bad.stderr and (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_sensitivity_page_shows_heatmap_ranking_and_allocation(cache_dir):
    import pathlib

    from streamlit.testing.v1 import AppTest

    _store_fake_grid(cache_dir, SensitivityRequest().resolve())
    at = AppTest.from_file(str(pathlib.Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300).run()
    at.switch_page("app_pages/sensitivity.py").run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert len(at.get("vega_lite_chart")) == 1  # the stored grid shows without pressing the button
    labels = {m.label: m.value for m in at.metric}
    assert float(labels["Achieved sparsity"]) >= 0.7
    assert "python -m sparsity_app model" in at.code[0].value
