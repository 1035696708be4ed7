"""The whole-model mode: the plan, the pipeline's contract through the CLI, the cache, the page."""
import json
import pathlib

import pytest
from streamlit.testing.v1 import AppTest

from sparsity_app.cli.main import main
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ModelPlan
from sparsity_app.core.results import ModelResult
from sparsity_app.model.catalog import get_model
from sparsity_app.runs import resolve

APP = str(pathlib.Path(__file__).resolve().parent.parent / "app.py")
LAYERS = [(info.name, info.shape) for info in get_model("minilm-l6").layers()]
SMALL = ["model", "--tokens", "16", "--repeat", "3", "--override", "ffn-out=2:4", "--override",
         "encoder.layer.5.*=dense", "--json"]


def test_plan_overrides_by_role_and_glob_last_match_wins():
    plan = ModelPlan(overrides=("attention.self.*=0.7", "ffn-out=dense", "encoder.layer.5.*=16x1@0.5", "q=2:4"))
    specs = resolve.plan(plan).specs
    assert specs["encoder.layer.0.attention.self.key"].sparsity == 0.7
    assert specs["encoder.layer.0.attention.output.dense"].sparsity == 0.9  # not "output.dense"
    assert specs["encoder.layer.0.output.dense"] is None
    assert specs["encoder.layer.5.output.dense"].block == (16, 1)  # a later override re-prunes it
    assert specs["encoder.layer.5.attention.self.query"].nm == (2, 4)
    assert all(s is None or s.tokens == 128 for s in specs.values())


@pytest.mark.parametrize("plan, words", [
    (ModelPlan(block=(5, 1)), "does not divide layer encoder.layer.0.attention.self.query"),
    (ModelPlan(overrides=("ffn-in=7x1@0.5",)), "does not divide layer encoder.layer.0.intermediate.dense"),
    (ModelPlan(overrides=("q",)), "an override must look like"),
    (ModelPlan(overrides=("q=1.5",)), "sparsity must be in [0, 0.99]"),
    (ModelPlan(overrides=("../etc=0.5",)), "must be a role"),
    (ModelPlan(batch=0), "batch must be"),
    (ModelPlan(tokens=600), "tokens (the sequence length)"),
    (ModelPlan(model="gpt9"), "valid models"),
])
def test_bad_plans_say_what_to_change(plan, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        from sparsity_app.runs import resolve
        resolve.plan(plan)


@pytest.mark.parametrize("args, words", [
    (["model", "--block", "5x1"], "bs_r=5 must divide"),
    (["model", "--override", "nonsense"], "an override must look like"),
    (["model", "--batch", "99"], "batch must be an integer in [1, 8]"),
    (["bench-model", "--configs", "minilm-l6:1y128"], "MODEL:BATCHxTOKENS"),
])
def test_model_cli_bad_input_is_one_line(args, words, capsys, cache_dir):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_model_json_contract_cache_and_page(cli):
    cold = cli(SMALL)
    assert cold.returncode == 0, cold.stderr[-2000:]
    d = json.loads(cold.stdout)
    assert {"plan", "sparsity_achieved", "layers", "times_ms", "speedup_vs_best_dense", "speedup_vs_torch_eager",
            "speedup_vs_tvm_dense", "breakdown", "amdahl_bound", "metrics", "dense_metrics", "max_abs_error",
            "cached", "machine"} <= d.keys()
    assert set(d["times_ms"]) == {"tvm_sparse", "tvm_dense", "torch_eager", "torch_eager_pruned", "onnxruntime"}
    assert all({"median", "spread"} <= t.keys() for t in d["times_ms"].values())
    assert d["max_abs_error"] <= 1e-4 and d["cached"] is False
    layers = {row["layer"]: row for row in d["layers"]}
    assert len(layers) == 36
    assert layers["encoder.layer.0.output.dense"]["format"] == "nm"
    assert layers["encoder.layer.0.output.dense"]["sparsity_achieved"] == 0.5
    assert layers["encoder.layer.5.intermediate.dense"]["format"] == "dense"
    assert layers["encoder.layer.1.attention.self.query"]["format"] == "bsr"
    assert abs(layers["encoder.layer.1.attention.self.query"]["sparsity_achieved"] - 0.9) < 1e-3
    pruned_weights = sum(r["dense_bytes"] / 4 * r["sparsity_achieved"] for r in d["layers"])
    assert d["sparsity_achieved"] == pytest.approx(pruned_weights / sum(r["dense_bytes"] / 4 for r in d["layers"]))
    assert all(row["kernel_ms"] > 0 for row in d["layers"])  # each linear's time inside the executable
    q, k, v = (layers[f"encoder.layer.1.attention.self.{n}"]["kernel_ms"] for n in ("query", "key", "value"))
    assert q == k == v  # one stacked kernel, its time shared evenly
    assert set(d["breakdown"]) == {"tvm_sparse", "tvm_dense"}
    assert d["breakdown"]["tvm_sparse"]["linears"] > 0 and d["amdahl_bound"] > 1
    assert d["dense_metrics"]["lee_pearson"] == pytest.approx(0.656, abs=0.002)
    assert d["metrics"]["lee_pearson"] < d["dense_metrics"]["lee_pearson"]
    assert ModelResult.from_dict(d).to_dict()["times_ms"] == d["times_ms"]

    warm = cli(SMALL)
    assert warm.returncode == 0 and json.loads(warm.stdout)["cached"] is True
    assert "compile]" not in warm.stderr and "compile]" in cold.stderr

    at = AppTest.from_file(APP, default_timeout=300)  # a link to the measured plan shows it without running
    for k, v in {"tokens": "16", "repeat": "3", "overrides": "ffn-out=2:4;encoder.layer.5.*=dense"}.items():
        at.query_params[k] = v
    at.run()
    at.switch_page("app_pages/model.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(m.label == "Speedup vs best dense" for m in at.metric)
    assert len(at.get("vega_lite_chart")) == 2  # the breakdown and the accuracy-vs-speedup chart
    assert any("Loaded from the cache" in c.value for c in at.caption)


def test_model_page_shows_a_bad_override_as_a_message(cache_dir):
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("app_pages/model.py").run()
    at.text_area(key="m_overrides").set_value("ffn-in=7x1@0.5")
    at.button(key="FormSubmitter:model-Run the whole model").click().run()
    assert not at.exception
    assert any("does not divide layer encoder.layer.0.intermediate.dense" in e.value for e in at.error)
