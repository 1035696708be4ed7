"""Adding an item is one module (here: a few lines of this file) plus one registry line: a toy pruning
method, kernel family, proxy, metric and recovery recipe, each registered in one place (`toys`), show
up in the CLI's choices, the app's selectors and a run, with nothing else touched."""
import dataclasses

import fake_jobs
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from test_jobs import TESTS

from sparsity_app.accuracy import metrics, proxies, recipes, recovery
from sparsity_app.cli.main import build_parser
from sparsity_app.core.requests import ModelPlan, RecoveryRequest, Spec
from sparsity_app.core.store import Store
from sparsity_app.kernels import KernelSource, Packed, dense, families
from sparsity_app.prune import methods
from sparsity_app.runs import resolve
from sparsity_app.runs.layer import run
from sparsity_app.runs.model import key_of
from sparsity_app.serve.links import plan_to_query, spec_to_query

APP = str(TESTS.parent / "app.py")


# ---- the toys ------------------------------------------------------------------------------------

def toy_mask(weight, spec, input_norms=None):
    """Keeps the larger half of each row (a pruning method is a mask function)."""
    return np.abs(weight) >= np.median(np.abs(weight), axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class ToyDense:
    """The toy family's format: the kept weights stored dense, float32 [out, in]."""

    values: np.ndarray

    shape = property(lambda self: self.values.shape)
    nbytes = property(lambda self: self.values.nbytes)
    density = property(lambda self: float((self.values != 0).mean()))

    def to_dense(self) -> np.ndarray:
        return self.values


@dataclasses.dataclass(frozen=True)
class ToyKnobs:
    vn: int = 32  # output features per panel
    tile: int = 8  # tokens per register tile

    def label(self) -> str:
        return f"toy dense, {self.vn} lanes, tile {self.tile}"


def toy_pack(weight: ToyDense, tokens: int, knobs: ToyKnobs, n_parts=None) -> Packed:
    """The project's dense GEMM on the kept weights: X row-major in, Y row-major out."""
    out_f, in_f = weight.shape
    panels = weight.values.reshape(out_f // knobs.vn, knobs.vn, in_f).transpose(0, 2, 1)
    source = KernelSource("toy", dense.dense_prim_func, (tokens, out_f, in_f, dense.DenseKnobs(knobs.vn, knobs.tile)))
    return Packed(source, weight.shape, tokens, (panels,), x_layout="row-major", y_feature_major=False)


TOY_FAMILY = families.Family(
    title="toy dense", serves=lambda spec: spec.method == "toy", to_format=lambda w, m, spec: ToyDense(w * m), knobs=ToyKnobs,
    pack=toy_pack, stack_rows=lambda ws: ToyDense(np.concatenate([w.values for w in ws])),
    default=lambda tokens, w: ToyKnobs(tile=min(8, tokens)),
    candidates=lambda tokens, w: [ToyKnobs(tile=min(8, tokens)), ToyKnobs(vn=16, tile=min(4, tokens))],
    variants=lambda knobs, w: [])


@pytest.fixture
def toys(monkeypatch, cache_dir):
    """One registry line each (the toy family goes first: the first family that serves a spec takes it)."""
    monkeypatch.setitem(methods.METHODS, "toy", methods.Method(toy_mask, "the larger half of each row",
                                                               unstructured=True))
    monkeypatch.setattr(families, "FAMILIES", {"toy": TOY_FAMILY, **families.FAMILIES})
    monkeypatch.setitem(proxies.PROXIES, "toy_kept", proxies.Proxy("toy: share kept", True, lambda c: float(c.mask.mean())))
    monkeypatch.setitem(metrics.METRICS, "toy_one", metrics.Metric("toy: always one", lambda e: 1.0))
    monkeypatch.setitem(recipes.RECIPES, "toy", recipes.Recipe(
        lambda req, specs, step: recipes.Phase(specs, remask=step == 0), "toy: the one-shot masks, fixed"))


def test_a_method_a_kernel_family_and_a_proxy_run_and_show(toys):
    assert build_parser().parse_args(["run", "--method", "toy"]).method == "toy"  # a CLI choice
    spec = Spec(model="bert-base-synthetic", layer="encoder.layer.0.attention.self.query", method="toy",
                sparsity=0.5, tokens=16)  # the default repeat: the link of its page names no repeat
    result = run(spec, store=Store())
    assert result.kernel["format"] == "toy" and result.kernel["schedule"].startswith("toy dense")  # its family ran
    assert result.sparsity_achieved == pytest.approx(0.5, abs=0.01)  # its mask
    assert result.proxies["toy_kept"] == pytest.approx(0.5, abs=0.01)  # the proxy scored it
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in spec_to_query(result.spec).items():
        at.query_params[k] = v
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "toy" in at.selectbox(key="method").options  # an app choice
    assert any(m.label == "toy: share kept" for m in at.metric)  # the page lists it with the others


def test_a_kernel_family_packs_its_linears_in_the_whole_model_graph(toys):
    from sparsity_app.model import graph
    from sparsity_app.model.catalog import get_model

    model = get_model("minilm-l6")
    hf = model.torch_model()
    name = "encoder.layer.0.intermediate.dense"
    weight, bias = model.weight(name)
    toy = ToyDense(weight * toy_mask(weight, None))
    encoder = graph.compile_encoder(hf, hf, {name: graph.LinearPlan("toy", toy, bias, ToyKnobs(tile=8))}, 1, 16)
    ids, mask = np.full((1, 16), 2023, np.int64), np.ones((1, 16), np.int64)
    assert graph.verify(encoder, model.pruned_copy({name: toy.values}), ids, mask) <= 1e-4


def test_a_metric_is_scored_and_offered(toys):
    assert build_parser().parse_args(["sensitivity", "--metric", "toy_one"]).metric == "toy_one"  # a CLI choice
    from sparsity_app.model.catalog import get_model

    minilm = get_model("minilm-l6")
    assert metrics.evaluate(minilm.torch_model(), minilm.tokenizer())["toy_one"] == 1.0  # an evaluation scores it
    plan = ModelPlan(model="bert-base-synthetic", tokens=16)
    resolved = resolve.plan(plan)
    Store().put_model_result(key_of(resolved.plan), fake_jobs.fake_result(resolved.plan, resolved.specs))
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in plan_to_query(plan).items():  # the page opened on the plan's link shows its stored result
        at.query_params[k] = v
    at.run()
    at.switch_page("app_pages/model.py").run()
    assert not at.exception, at.exception
    assert "toy: always one" in at.selectbox(key="m_metric").options  # an app choice, by its label


def test_a_recipe_trains_and_is_offered(toys):
    assert build_parser().parse_args(["recover", "--recipe", "toy"]).recipe == "toy"  # a CLI choice
    plan = ModelPlan(method="block", block=(32, 1), sparsity=0.5)
    resolved = resolve.recovery(RecoveryRequest(plan=plan, recipe="toy", steps=2, batch=2, seq_len=16))
    weights, masks, steps, *_ = recovery.train(resolved.request, resolved.plan.specs, None, lambda s, d: None, None)
    assert steps == 2 and all((w[~masks[n]] == 0).all() for n, w in weights.items())  # it trained, masks held
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("app_pages/recover.py").run()
    assert not at.exception, at.exception
    assert "toy" in at.selectbox(key="r_recipe").options  # an app choice
