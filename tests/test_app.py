"""Every page through streamlit's AppTest: renders, runs the engine, shows errors on the page."""
import pathlib

import pytest
from streamlit.testing.v1 import AppTest

APP = str(pathlib.Path(__file__).resolve().parent.parent / "app.py")


def _app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def _charts(at) -> int:
    return len(at.get("vega_lite_chart"))


def _ok(at) -> None:
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


@pytest.mark.parametrize("page", ["app_pages/explore.py", "app_pages/sweep.py", "app_pages/learn.py"])
def test_every_page_renders(page, cache_dir):
    at = _app()
    at.switch_page(page).run()
    _ok(at)
    assert at.title


def test_explore_run_shows_metrics_mask_and_chart(cache_dir):
    at = _app()
    assert _charts(at) == 0  # nothing is compiled before Run
    at.button(key="FormSubmitter:explore-Run").click().run()
    _ok(at)
    labels = {m.label: m.value for m in at.metric}
    assert labels["Speedup vs best dense"].endswith("x")
    assert any(k.endswith("(best dense)") for k in labels)  # the fastest dense peer is named
    assert labels["Achieved sparsity"] == "0.900"
    assert _charts(at) == 2  # the mask and the trade-off chart
    assert any("Measured on" in c.value for c in at.caption)
    schedule = [e for e in at.expander if e.label.startswith("Schedule: ")]
    assert len(schedule) == 1 and "faster than the untuned default" in schedule[0].label
    assert len(at.dataframe[-1].value) >= 3  # the tuner's trials, one row per schedule timed
    link = {k: at.query_params[k] for k in at.query_params}
    assert link["block"] == "32x1" and link["layer"] == "encoder.layer.0.attention.self.query"

    again = _app(**link)  # opening the link shows the same result, from the cache
    _ok(again)
    assert _charts(again) == 2 and any("Loaded from the cache" in c.value for c in again.caption)


def test_bad_query_parameter_shows_a_note_and_the_default(cache_dir):
    at = _app(block="banana", sparsity="7", layer="encoder.layer.2.intermediate.dense")
    _ok(at)
    notes = " ".join(w.value for w in at.warning)
    assert "block='banana'" in notes and "sparsity='7'" in notes
    assert at.selectbox(key="block").value == "32x1" and at.slider(key="sparsity").value == 0.9
    assert at.selectbox(key="layer").value == "encoder.layer.2.intermediate.dense"  # valid values are kept


def test_engine_error_is_a_message_on_the_page(cache_dir):
    at = _app()
    at.selectbox(key="block").set_value("custom")
    at.text_input(key="custom_block").set_value("5x5")
    at.button(key="FormSubmitter:explore-Run").click().run()
    assert not at.exception
    assert any("must divide the output dimension 384" in e.value for e in at.error)


def test_sweep_runs_the_grid_and_draws_four_charts(cache_dir):
    at = _app()
    at.switch_page("app_pages/sweep.py").run()
    at.selectbox(key="sweep_model").set_value("bert-base-synthetic").run()
    at.number_input(key="sweep_tokens").set_value(16)
    at.multiselect(key="sweep_blocks").set_value(["32x1", "4x4"])
    at.multiselect(key="sweep_sparsities").set_value([0.8, 0.95])
    at.button(key="FormSubmitter:sweep-Run sweep").click().run()
    _ok(at)
    assert _charts(at) == 4
    assert any("4 of 4 points measured" in c.value for c in at.caption)
    assert at.get("download_button")


def test_learn_example_follows_the_block_and_claims_run(cache_dir):
    at = _app()
    at.switch_page("app_pages/learn.py").run()
    before = [c.value for c in at.code]
    at.radio(key="learn_block").set_value((4, 4)).run()
    assert [c.value for c in at.code] != before
    at.selectbox(key="learn_model").set_value("minilm-l6")
    at.number_input(key="learn_tokens").set_value(16)
    at.button(key="learn_test").click().run(timeout=600)  # a whole-model run and the layer claims: ~1.5 min quiet
    _ok(at)
    frames = [d.value for d in at.dataframe]
    claims = next(f for f in frames if "claim" in f.columns)
    assert len(claims) == 4 and set(claims.columns) == {"claim", "paper", "measured", "holds"}
    assert claims["measured"].str.contains("whole minilm-l6").sum() == 3  # says what it compared
    assert claims["measured"].str.contains("16x16").any()
    times = next(f for f in frames if "implementation" in f.columns)
    assert any("default schedule" in name for name in times["implementation"])
