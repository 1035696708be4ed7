"""bench-model --lengths: its flag and its verdicts (the timing itself is a command's figure, not a test's)."""
import pytest

from sparsity_app import UserError
from sparsity_app.bench.lengths import format_lengths, length_targets, parse_lengths
from sparsity_app.core.results import Timing


def test_lengths_flag():
    assert parse_lengths("8..12") == [8, 9, 10, 11, 12]
    assert parse_lengths("8..128:40") == [8, 48, 88, 128]
    assert parse_lengths("31, 24,27,24") == [24, 27, 31]
    for bad in ("0..8", "12..8", "8..x", "8..16:0", ""):
        with pytest.raises(UserError, match="--lengths must look like"):
            parse_lengths(bad)


def _rows(ms: dict[int, tuple[float, float]]) -> list[dict]:
    """Made-up rows: tokens -> (TVM sparse ms, TVM dense ms)."""
    return [{"tokens": t, "batch": 1, "times_ms": {"tvm_sparse": Timing(s, 0.01, s, s, 3), "tvm_dense": Timing(d, 0.01, d, d, 3),
                                                   "torch_eager": Timing(9.0, 0.1, 9, 9, 3),
                                                   "onnxruntime": Timing(7.0, 0.1, 7, 7, 3)}}
            for t, (s, d) in ms.items()]


def test_a_jump_at_an_awkward_length_and_an_inflated_ratio_are_missed():
    steady = length_targets(_rows({27: (1.0, 6.0), 31: (1.1, 6.1), 32: (1.0, 6.2)}))
    assert steady.count(" ok") == 3 and "MISSED" not in steady
    jumps = length_targets(_rows({27: (2.0, 30.0), 32: (1.0, 6.0)}))  # the table: dense 5x slower at 27
    assert "TVM sparse: worst length 27 at 2.00x the time of 32 (<= 1.15) MISSED" in jumps
    assert "TVM dense: worst length 27 at 5.00x" in jumps and "15.00x at 27 tokens, 2.50x the 32-token" in jumps
    alone = length_targets(_rows({30: (1.0, 6.0)}))
    assert "not judged" in alone
    assert "27       2.000 ±" in format_lengths(_rows({27: (2.0, 30.0)}))


def test_the_model_page_charts_a_plan_at_every_stored_length(cache_dir):
    """Stored results of one plan at 16 and 27 tokens (made up) make the Whole model page's time-per-length
    chart; a result of another pattern or batch is not on it."""
    import dataclasses
    import pathlib

    from fake_jobs import fake_result
    from streamlit.testing.v1 import AppTest

    from sparsity_app.core.requests import ModelPlan
    from sparsity_app.core.store import Store
    from sparsity_app.runs import resolve
    from sparsity_app.runs.model import key_of
    from sparsity_app.serve.analysis import length_frame

    store, results = Store(), []
    for plan in (ModelPlan(tokens=16, repeat=3), ModelPlan(tokens=27, repeat=3), ModelPlan(tokens=16, batch=2, repeat=3),
                 ModelPlan(tokens=16, sparsity=0.5, repeat=3)):
        resolved = resolve.plan(plan)
        result = fake_result(resolved.plan, resolved.specs)
        if plan.tokens == 27:  # slower at 27 tokens
            result = dataclasses.replace(result, times_ms={k: dataclasses.replace(t, median=2 * t.median)
                                                           for k, t in result.times_ms.items()})
        store.put_model_result(key_of(result.plan), result)  # where the page looks
        results.append(result)
    frame = length_frame(store.model_results(model="minilm-l6"), results[0])
    assert sorted(set(frame["tokens"])) == [16, 27] and len(frame) == 8  # 4 implementations x 2 lengths
    assert frame.set_index(["tokens", "implementation"]).loc[(27, "TVM sparse"), "ms"] == 4.0
    noisy = dataclasses.replace(results[1], noisy="made up")  # noise is never a point of the lesson
    assert set(length_frame([results[0], noisy], results[0])["tokens"]) == {16}
    store.close()

    def page(query):
        at = AppTest.from_file(str(pathlib.Path(__file__).parents[1] / "app.py"), default_timeout=120)
        for k, v in query.items():
            at.query_params[k] = v
        at.run().switch_page("app_pages/model.py").run()
        assert not at.exception and not at.error
        return len(at.get("vega_lite_chart")), any("at other token counts" in c.value for c in at.caption)

    # synthetic weights: no accuracy chart; the breakdown, and time per length where two lengths are stored
    assert page({"tokens": "27", "repeat": "3"}) == (2, False)
    assert page({"tokens": "16", "batch": "2", "repeat": "3"}) == (1, True)  # one length: a hint instead
