"""Untrusted input: every hostile link parameter and form value gives a message and the defaults, never a
traceback; nothing from a link becomes markup on the page; Streamlit's XSRF protection stays on."""
import pathlib
import re
import tomllib

import pytest
from streamlit.testing.v1 import AppTest

from sparsity_app.core.requests import ModelPlan, Spec
from sparsity_app.measure import locks
from sparsity_app.serve.links import plan_from_query, spec_from_query

ROOT = pathlib.Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
PAGES = ["app_pages/explore.py", "app_pages/sweep.py", "app_pages/model.py", "app_pages/learn.py"]
LONG = "encoder." * 20_000  # 160,000 characters
HOSTILE = {  # name -> query; every parameter in it is invalid (a repeated key: its last value, the one read, is)
    "unknown model, path as layer": {"model": "gpt-9", "layer": "../../etc/passwd"},
    "huge and fractional tokens": {"tokens": "9" * 5000, "batch": "1e3"},
    "NaN sparsity, 0x0 block": {"sparsity": "nan", "block": "0x0", "threads": "-1"},
    "inf sparsity, 1000000x1 block": {"sparsity": "inf", "block": "1000000x1", "repeat": "1e9"},
    "negative sparsity, nm 5:4": {"sparsity": "-0.5", "nm": "5:4", "method": "__import__('os')"},
    "overrides with paths and code": {"overrides": "../../etc/passwd=0.5;q=__import__('os').system('id')",
                                      "norm": "/dev/zero"},
    "overrides with a glob at nan": {"overrides": "*=nan", "model": "minilm-l6\x00"},
    "repeated keys": {"block": ["32x1", "banana"], "tokens": ["128", "-1"]},
    "unicode": {"method": "ｂｌｏｃｋ", "layer": "encoder.layer.0.attention.self.query\u202e", "model": "ミニLM"},
    "very long strings": {"layer": LONG, "method": LONG, "overrides": LONG + "=0.5"},
    "markup": {"block": "[click me](https://evil.example)", "model": "<img src=x onerror=alert(1)>",
               "evil": ":red[owned] **bold**"},
}
DEFAULTS = {  # what each page shows when every parameter of the link was refused: widget key -> value
    "app_pages/explore.py": {"model": "minilm-l6", "layer": Spec().layer, "block": "32x1", "sparsity": 0.9,
                             "tokens": 128, "method": "block"},
    "app_pages/sweep.py": {"sweep_model": "minilm-l6", "sweep_layer": Spec().layer, "sweep_tokens": 128},
    "app_pages/model.py": {"m_model": "minilm-l6", "m_block": "32x1", "m_sparsity": 0.9, "m_tokens": 128,
                           "m_method": "block", "m_overrides": ""},
    "app_pages/learn.py": {},
}


def _plain(markdown: str) -> str:
    """The text a reader sees: backslash escapes removed."""
    return re.sub(r"\\(.)", r"\1", markdown)


@pytest.mark.parametrize("page", PAGES)
def test_every_hostile_link_gives_notes_and_the_defaults_on_every_page(page, cache_dir):
    for case, query in HOSTILE.items():
        at = AppTest.from_file(APP, default_timeout=120)
        for name, value in query.items():
            at.query_params[name] = value
        at.switch_page(page).run()
        assert not at.exception, (case, at.exception)
        assert not at.error, (case, [e.value for e in at.error])
        notes = [w.value for w in at.warning]
        seen = _plain(" ".join(notes))
        for name in query:  # each refused parameter is named in a note
            assert f"ignored {name}=" in seen or f"ignored '{name}'" in seen, (case, name, notes)
        assert all(len(n) < 1000 for n in notes), case  # long input is cut short
        for note in notes:  # a link puts no working markup on the page: every special character is escaped
            assert not re.search(r"(?<!\\)[\[\]<>*:]", note), (case, note)
        for key, value in DEFAULTS[page].items():
            widget = next(w for w in [*at.selectbox, *at.slider, *at.number_input, *at.text_area] if w.key == key)
            assert widget.value == value, (case, key, widget.value)
    assert not locks.holds()  # nothing was measured


def test_links_map_every_invalid_parameter_to_its_default_and_keep_the_valid_ones():
    spec, notes = spec_from_query({"block": "0x0", "sparsity": "inf", "layer": "encoder.layer.2.output.dense",
                                   "tokens": "600"})
    assert spec == Spec(layer="encoder.layer.2.output.dense")
    assert len(notes) == 3 and any("at most 512 tokens" in _plain(n) for n in notes)  # the server's limit
    plan, notes = plan_from_query({"overrides": "ffn-in=dense;../x=0.5", "batch": "2"})
    assert plan == ModelPlan(batch=2) and len(notes) == 1


HOSTILE_BLOCKS = ["0x0", "1000000x1", "../../etc/passwd", "9" * 5000 + "x1", "[a](https://evil.example)", "4x4; rm -rf /"]


def test_hostile_custom_blocks_on_explore_are_a_message_each(cache_dir):
    at = AppTest.from_file(APP, default_timeout=120).run()
    for text in HOSTILE_BLOCKS:
        at.selectbox(key="block").set_value("custom")
        at.text_input(key="custom_block").set_value(text)
        at.button(key="FormSubmitter:explore-Run").click().run()
        assert not at.exception, text
        assert len(at.error) == 1 and len(at.error[0].value) < 1000, text
        assert not re.search(r"(?<!\\)[\[\]]", at.error[0].value), text
    assert not locks.holds()


HOSTILE_OVERRIDES = ["../../etc/passwd=0.5", "q=nan", "*=1e999", "encoder.layer.0.*=__import__('os')", "=", "q",
                     "ffn-in=0.5@0.5", "v=99:4"]


def test_hostile_overrides_on_the_whole_model_page_are_a_message_each(cache_dir):
    at = AppTest.from_file(APP, default_timeout=120)
    at.switch_page("app_pages/model.py").run()
    for text in HOSTILE_OVERRIDES:
        at.text_area(key="m_overrides").set_value(text)
        at.button(key="FormSubmitter:model-Run the whole model").click().run()
        assert not at.exception, text
        assert len(at.error) == 1 and "override" in at.error[0].value, (text, [e.value for e in at.error])
    assert not locks.holds()  # refused before anything was measured


def test_streamlit_xsrf_and_cors_protection_stay_on():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["enableXsrfProtection"] is True and config["server"]["enableCORS"] is True
    assert config["client"]["showErrorDetails"] in ("type", "none")  # no traceback on the page
    assert config["server"]["fileWatcherType"] == "none"  # a shared server does not re-scan its modules every run
    for path in (ROOT / "Dockerfile", ROOT / ".ci" / "run", ROOT / "README.md"):  # nothing turns them off
        text = path.read_text().lower()
        assert "enablexsrfprotection=false" not in text and "enable_xsrf_protection" not in text, path
        assert "enablecors=false" not in text, path
