"""Recovery fine-tuning: recipes keep their patterns, schedules do what they say, runs resume exactly."""
import dataclasses
import json
import pathlib

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from sparsity_app.accuracy import recipes, recovery
from sparsity_app.accuracy.recipes import RECIPES, RecoveryStopped, nm_stages
from sparsity_app.core.errors import UserError
from sparsity_app.core.requests import ModelPlan, RecoveryRequest
from sparsity_app.core.store import Store, model_key_of
from sparsity_app.model import corpus
from sparsity_app.runs import resolve

APP = str(pathlib.Path(__file__).resolve().parent.parent / "app.py")
BLOCK = ModelPlan(method="block", block=(32, 1), sparsity=0.5)
NM = ModelPlan(method="nm", nm=(2, 4))
TINY = dict(steps=4, batch=2, seq_len=16, mask_interval=2)  # every recipe passes through each of its phases


def _specs(plan):
    return resolve.plan(plan).specs


def _train(req, checkpoint=None, time_limit_s=None):
    req = resolve.recovery(req).request
    return recovery.train(req, _specs(req.plan), checkpoint, lambda s, d: None, time_limit_s)


def test_nm_stages_step_from_the_first_sparse_stage_to_the_target():
    assert nm_stages(2, 4) == [3, 2]
    assert nm_stages(1, 8) == [4, 2, 1]
    assert nm_stages(4, 8) == [6, 4]
    assert nm_stages(1, 4) == [2, 1]
    assert nm_stages(1, 2) == [1]


def test_schedules_reach_the_target_pattern_and_stay_there():
    steps = 30
    layer = "encoder.layer.0.attention.self.query"
    req = resolve.recovery(RecoveryRequest(plan=BLOCK, recipe="gradual", steps=steps)).request
    sparsities = [RECIPES["gradual"].phase(req, _specs(BLOCK), t).specs[layer].sparsity for t in range(steps)]
    assert sparsities[0] == 0 and sparsities == sorted(sparsities) and sparsities[-1] == 0.5
    assert sparsities[20] == 0.5 and sparsities[19] < 0.5  # cubic ramp over 2/3 of the steps
    assert sparsities[5] - sparsities[0] > sparsities[18] - sparsities[13]  # fast first, slow last

    req = resolve.recovery(RecoveryRequest(plan=BLOCK, recipe="mask-decay", steps=steps)).request
    betas = [RECIPES["mask-decay"].phase(req, _specs(BLOCK), t).beta for t in range(steps)]
    assert betas[0] == 1.0 and betas[:20] == sorted(betas[:20], reverse=True) and set(betas[20:]) == {0.0}
    req = dataclasses.replace(req, beta_schedule="exponential")
    exp = [RECIPES["mask-decay"].phase(req, _specs(BLOCK), t).beta for t in range(steps)]
    assert exp[0] == 1.0 and all(e < b for e, b in zip(exp[1:20], betas[1:20])) and set(exp[20:]) == {0.0}

    req = resolve.recovery(RecoveryRequest(plan=NM, recipe="structure-decay", steps=steps)).request
    phases = [RECIPES["structure-decay"].phase(req, _specs(NM), t) for t in range(steps)]
    stages = [None if p.specs[layer] is None else p.specs[layer].nm for p in phases]
    assert stages[:20] == [(3, 4)] * 20 and stages[20:] == [(2, 4)] * 10  # no dense frame: it would train nothing
    assert [t for t, p in enumerate(phases) if p.remask] == [0, 20]
    req = resolve.recovery(RecoveryRequest(plan=dataclasses.replace(NM, nm=(1, 8)), recipe="structure-decay", steps=steps)).request
    stages = [RECIPES["structure-decay"].phase(req, _specs(req.plan), t).specs[layer].nm for t in range(steps)]
    assert stages == [(4, 8)] * 10 + [(2, 8)] * 10 + [(1, 8)] * 10

    req = resolve.recovery(RecoveryRequest(plan=NM, recipe="sr-ste", steps=steps)).request
    phases = [RECIPES["sr-ste"].phase(req, _specs(NM), t) for t in range(steps)]
    assert all(p.remask for p in phases) and all(p.ste and p.decay > 0 for p in phases[:-1])
    assert phases[-1].hard  # the run ends on a binary mask

    req = resolve.recovery(RecoveryRequest(plan=BLOCK, recipe="group-lasso", steps=steps)).request
    phases = [RECIPES["group-lasso"].phase(req, _specs(BLOCK), t) for t in range(steps)]
    assert all(p.group_lasso > 0 and p.specs[layer] is None for p in phases[:20])
    assert phases[20].remask and all(p.group_lasso == 0 and p.specs[layer] is not None for p in phases[20:])


@pytest.mark.parametrize("recipe,plan", [("fixed", BLOCK), ("gradual", BLOCK), ("mask-decay", BLOCK),
                                         ("group-lasso", BLOCK), ("sr-ste", NM), ("structure-decay", NM)])
def test_every_recipe_ends_on_the_plans_pattern_and_learns(recipe, plan):
    from sparsity_app.model.catalog import get_model
    from sparsity_app.model.pruned import pruned_weights

    weights, masks, steps, *_ = _train(RecoveryRequest(plan=plan, recipe=recipe, **TINY))
    one_shot_masks, one_shot = pruned_weights(plan.model, _specs(plan))
    assert steps == TINY["steps"] and set(weights) == set(one_shot)
    for name, w in weights.items():
        m = masks[name]
        assert w.dtype == np.float32 and m.dtype == bool and w.shape == m.shape
        assert not w[~m].any()  # masks enforced: every dropped weight is exactly zero
        if plan.nm:
            assert (m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all()  # 2 of every 4 inputs
        else:
            assert m.mean() == pytest.approx(0.5, abs=1 / 64)
            rows = m.reshape(m.shape[0] // 32, 32, m.shape[1])  # whole 32x1 blocks kept or dropped
            assert (rows.all(axis=1) | ~rows.any(axis=1)).all()
    changed = max(float(np.abs(weights[n] - one_shot[n]).max()) for n in weights)
    assert changed > 1e-6  # it trained
    shared = get_model("minilm-l6").torch_model()
    for name in list(weights)[:3]:  # the shared model's weights are the file's: training touched a copy
        np.testing.assert_array_equal(shared.get_submodule(name).weight.detach().numpy(),
                                      get_model("minilm-l6").weight(name)[0])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in shared.modules())  # nor its hooks


def test_each_loss_is_zero_on_the_teacher_and_grows_as_the_student_drifts():
    import torch

    from sparsity_app.accuracy.recipes import LOSSES

    g = torch.Generator().manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(3))
    near = tuple(t + 0.01 * torch.randn(t.shape, generator=g) for t in teacher)
    far = tuple(t + 1.0 * torch.randn(t.shape, generator=g) for t in teacher)
    for name, loss in LOSSES.items():
        assert float(loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6), name
        assert 0 < float(loss(near, teacher)) < float(loss(far, teacher)), name
    assert float(LOSSES["pooled"](tuple(2 * t for t in teacher), teacher)) == pytest.approx(0.0, abs=1e-6)  # cosine


@pytest.mark.parametrize("loss", ["pooled", "hidden+pooled"])
def test_the_other_losses_train_too(loss):
    weights, masks, *_ = _train(RecoveryRequest(plan=BLOCK, recipe="fixed", loss=loss, **TINY))
    from sparsity_app.model.pruned import pruned_weights

    _, one_shot = pruned_weights(BLOCK.model, _specs(BLOCK))
    assert max(float(np.abs(weights[n] - one_shot[n]).max()) for n in weights) > 1e-6
    assert all(not weights[n][~masks[n]].any() for n in weights)


def test_a_schedule_cut_short_still_ends_on_the_plans_pattern():
    """gradual at decay_fraction 0.9 over 2 steps never reaches its target inside the loop."""
    weights, masks, *_ = _train(RecoveryRequest(plan=BLOCK, recipe="gradual", steps=2, batch=2, seq_len=16,
                                                decay_fraction=0.9))
    assert all(m.mean() == pytest.approx(0.5, abs=1 / 64) for m in masks.values())
    assert all(not w[~masks[n]].any() for n, w in weights.items())


def test_recovery_arrows_pair_each_recovered_result_with_its_one_shot_twin():
    from types import SimpleNamespace

    from sparsity_app.serve import analysis

    def result(plan, recovery, lee, speedup):
        d = {"speedup_vs_best_dense": speedup, "speedup_vs_torch_eager": speedup, "speedup_vs_tvm_dense": speedup,
             "speedup_vs_onnxruntime": speedup}
        return SimpleNamespace(plan=plan, recovery=recovery, metrics={"lee_pearson": lee}, to_dict=lambda: d)

    fixed = {"recipe": "fixed", "steps": 300}
    results = [result(BLOCK, None, 0.33, 3.0), result(BLOCK, fixed, 0.55, 2.9), result(NM, fixed, 0.5, 1.5)]
    df = analysis.recovery_arrows(results)  # NM has no one-shot twin: left out
    assert list(df["stage"]) == ["one-shot", "recovered"] and list(df["lee_pearson"]) == [0.33, 0.55]
    assert df["pair"].nunique() == 1 and set(df["recipe"]) == {"fixed"}


def test_a_stopped_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    req = RecoveryRequest(plan=BLOCK, recipe="mask-decay", **{**TINY, "seq_len": 32})  # steps of 16 and 32 tokens
    assert recipes.LENGTHS[req.lengths](req.seq_len) == (16, 32)
    whole, whole_masks, *_ = _train(req)
    checkpoint = tmp_path / "ck" / "checkpoint.pt"
    with pytest.raises(RecoveryStopped, match="after 1 of 4 steps"):
        _train(req, checkpoint, time_limit_s=0.0)
    assert checkpoint.exists()
    resumed, resumed_masks, steps, _, losses, resumed_from = _train(req, checkpoint)
    assert resumed_from == 1 and steps == 4
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name])
        np.testing.assert_array_equal(resumed_masks[name], whole_masks[name])


def test_mixed_lengths_cut_every_step_into_the_same_tokens():
    from sparsity_app.model.catalog import get_model

    mixed = recipes.LENGTHS["mixed"]
    assert mixed(128) == (16, 32, 64, 128) and mixed(100) == (25, 50, 100) and mixed(16) == (16,) and mixed(24) == (24,)
    req = resolve.recovery(RecoveryRequest(plan=BLOCK)).request
    assert (req.lengths, req.batch, req.seq_len) == ("mixed", 16, 128)
    batches = [recipes.batch_at(req, step) for step in range(8)]
    assert [b.shape for b in batches] == [(128, 16), (64, 32), (32, 64), (16, 128)] * 2
    tok = get_model("minilm-l6").tokenizer()
    for b in batches:
        assert b.size == 16 * 128 and (b[:, 0] == tok.cls_token_id).all() and (b[:, -1] == tok.sep_token_id).all()
        assert (b != tok.pad_token_id).all()  # whole windows of the training text, never padding
    assert not np.array_equal(batches[0], batches[4])  # the next sequences of that length, not the same again
    np.testing.assert_array_equal(recipes.batch_at(req, 5), batches[5])  # indexed by step alone
    short = {r.tobytes() for r in corpus.training_sequences(16)}
    assert all(r.tobytes() in short for r in batches[0])
    fixed = dataclasses.replace(req, lengths="fixed")
    assert {recipes.batch_at(fixed, step).shape for step in range(4)} == {(16, 128)}


def test_requests_are_validated_and_canonical():
    with pytest.raises(UserError, match="unknown lengths 'short'; valid: mixed, fixed"):
        resolve.recovery(RecoveryRequest(lengths="short")).request
    # a run stored before `lengths` existed trained on seq_len tokens only: it reads back as such
    old = {k: v for k, v in resolve.recovery(RecoveryRequest(plan=BLOCK)).request.to_dict().items() if k != "lengths"}
    assert RecoveryRequest.from_dict(old).lengths == "fixed"
    with pytest.raises(UserError, match="valid recipes: fixed, gradual"):
        resolve.recovery(RecoveryRequest(recipe="magic")).request
    with pytest.raises(UserError, match="steps must be an integer"):
        resolve.recovery(RecoveryRequest(steps=0)).request
    with pytest.raises(UserError, match="valid losses: hidden, pooled, hidden\\+pooled"):
        resolve.recovery(RecoveryRequest(loss="kl")).request
    with pytest.raises(UserError, match="random weights"):
        resolve.recovery(RecoveryRequest(plan=ModelPlan(model="bert-base-synthetic"))).request
    with pytest.raises(UserError, match="N:M"):
        _train(RecoveryRequest(plan=BLOCK, recipe="structure-decay", **TINY))
    # knobs a recipe ignores, and the plan's timing fields, do not split the cache
    a = RecoveryRequest(plan=dataclasses.replace(BLOCK, tokens=64, repeat=5), recipe="fixed", beta_schedule="exponential")
    assert resolve.recovery(a).request == resolve.recovery(RecoveryRequest(plan=BLOCK, recipe="fixed")).request
    assert RecoveryRequest.from_dict(json.loads(json.dumps(resolve.recovery(a).request.to_dict()))) == resolve.recovery(a).request
    # ...nor does a change of another recipe's default: ignored knobs take fixed values, so a run stored before
    # group-lasso's penalty was tuned (2e-5 -> 2e-6) is still the same fixed-recipe request
    stored_before = dataclasses.replace(resolve.recovery(RecoveryRequest(plan=BLOCK, recipe="fixed")).request, group_lasso=2e-5)
    assert resolve.recovery(RecoveryRequest(plan=BLOCK, recipe="fixed", group_lasso=0.3)).request == stored_before
    assert resolve.recovery(RecoveryRequest(plan=BLOCK, recipe="group-lasso")).request.group_lasso == RecoveryRequest().group_lasso


def test_recover_scores_stores_and_the_whole_model_runs_on_the_recovered_weights(cli, cache_dir):
    """The CLI's recover, then `model --recipe`: the compiled executable carries the recovered weights
    (verified against PyTorch with them) and its metrics are the recovery's; then the page shows it."""
    args = ["--sparsity", "0.5", "--recipe", "fixed", "--steps", "3", "--train-batch", "2", "--seq-len", "16"]
    out = cli(["recover", *args, "--json"])
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for k in ("plan", "recipe", "steps", "wall_s", "metrics_before", "metrics_after", "dense_metrics", "cached"):
        assert k in d
    for metrics in (d["metrics_before"], d["metrics_after"], d["dense_metrics"]):
        assert {"lee_pearson", "polarity_probe_acc", "wordsim_spearman", "simlex_spearman"} <= set(metrics)
    assert d["steps"] == 3 and not d["cached"] and d["metrics_after"] != d["metrics_before"]
    assert d["dense_metrics"]["lee_pearson"] == pytest.approx(0.656, abs=0.002)
    again = cli(["recover", *args, "--json"])
    assert json.loads(again.stdout)["cached"] and json.loads(again.stdout)["metrics_after"] == d["metrics_after"]

    model = cli(["model", *args, "--tokens", "16", "--repeat", "3", "--json"])
    assert model.returncode == 0, model.stderr
    m = json.loads(model.stdout)
    assert m["recovery"]["recipe"] == "fixed" and m["recovery"]["key"] == d["key"]
    assert m["metrics"] == pytest.approx(d["metrics_after"], abs=1e-6)
    assert m["max_abs_error"] < 1e-4

    store = Store(cache_dir)
    weights, masks = store.recovered_weights(d["key"])
    assert len(weights) == 36 and all(not w[~masks[n]].any() for n, w in weights.items())
    # The one-shot model's point, for the page's arrow: the same pattern, so the same timing (compiling the
    # one-shot model again would double this test's ~2 min); its metrics are the ones the recovery measured.
    [recovered] = store.model_results()
    one_shot = dataclasses.replace(recovered, recovery=None, metrics=d["metrics_before"])
    store.put_model_result(model_key_of(one_shot.plan, one_shot.machine), one_shot)
    store.close()

    # The page: the stored recovery at once (no job), its recipes table, and the arrow from the
    # one-shot model to the recovered one.
    query = {"sparsity": "0.5", "recipe": "fixed", "steps": "3", "train_batch": "2", "seq_len": "16", "tokens": "16",
             "repeat": "3"}
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = v
    at.run().switch_page("app_pages/recover.py").run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert len(at.metric) == 4 and "vs one-shot" in at.metric[0].delta
    assert not at.dataframe[0].value.empty  # the recipes table
    assert len(at.get("vega_lite_chart")) >= 1  # the arrow from one-shot to recovered


def test_recover_page_survives_a_bad_link(cache_dir):
    bad = AppTest.from_file(APP, default_timeout=60)
    for k, v in {"recipe": "rm -rf", "steps": "-1", "seq_len": "x"}.items():
        bad.query_params[k] = v
    bad.run().switch_page("app_pages/recover.py").run()
    assert not bad.exception
    warned = " ".join(w.value for w in bad.warning)
    for name in ("recipe", "steps", "seq_len"):
        escaped = name.replace("_", r"\_")  # notes are Markdown-escaped
        assert f"ignored {escaped}=" in warned  # each bad value named, and its default used
    assert "reads no parameter" not in warned  # the recovery's parameters are this page's own

    good = AppTest.from_file(APP, default_timeout=60)
    for k, v in {"recipe": "mask-decay", "steps": "100", "train_batch": "8", "seq_len": "64"}.items():
        good.query_params[k] = v
    good.run().switch_page("app_pages/recover.py").run()
    assert not good.exception and not good.warning
    assert good.selectbox(key="r_recipe").value == "mask-decay" and good.number_input(key="r_steps").value == 100


def test_bench_recovery_at_another_seed_says_so_in_every_verdict(cli):
    out = cli(["bench-recovery", "--stored", "--train-seed", "1", "--skip-one-shot", "--skip-probe-spread"])
    assert out.returncode == 0, out.stderr
    assert "no target run is stored" in out.stderr  # a private, empty cache
    verdicts = [line for line in out.stdout.splitlines() if "not run" in line]
    assert verdicts and all(line.startswith("training seed 1 (one seed: reported, not judged): ")
                            for line in verdicts), out.stdout


def test_bench_recovery_across_seeds_on_an_empty_cache_prefixes_each_seed_and_the_mean(cli):
    out = cli(["bench-recovery", "--stored", "--across-seeds", "0,2", "--only", "0.9", "--json"])
    assert out.returncode == 0, out.stderr
    assert "training seed 2: 0 of 6 target runs stored" in out.stderr
    d = json.loads(out.stdout)
    assert d["seeds"] == [0, 2] and d["rows"] == [] and d["code"] is None
    assert "training seed 2 (reported): 32x1 at 90%: fixed or every other recipe not run" in d["verdicts"]
    assert "mean over training seeds 0, 2 (judged): 32x1 at 90%: fixed or every other recipe not run" in d["verdicts"]
    assert "mean over training seeds 0, 2 (judged): 32x1 at 90% from sparsegpt: not run" in d["verdicts"]


def test_bench_recovery_judges_on_three_seeds_unless_told_one(cli):
    """The fixed protocol is the default: every target run at training seeds 0, 1 and 2, judged on the means."""
    out = cli(["bench-recovery", "--stored", "--only", "sparsegpt", "--json"])
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["seeds"] == [0, 1, 2] and "training seed 1: 0 of 2 target runs stored" in out.stderr
    assert "mean over training seeds 0, 1, 2 (judged): 32x1 at 90% from sparsegpt: not run" in d["verdicts"]


def test_across_seeds_judges_the_means_of_runs_stored_at_every_seed():
    from types import SimpleNamespace

    from sparsity_app.bench import recovery as b

    def run(plan, recipe, lee, probe):
        return SimpleNamespace(request=RecoveryRequest(plan=plan, recipe=recipe),
                               metrics_after={"lee_pearson": lee, "polarity_probe_acc": probe})

    by_seed = {0: [run(b.BLOCK_90, "fixed", 0.48, 0.70), run(b.BLOCK_90, "gradual", 0.51, 0.66),
                   run(b.BLOCK_50, "fixed", 0.70, 0.685)],
               1: [run(b.BLOCK_90, "gradual", 0.59, 0.62), run(b.BLOCK_90, "fixed", 0.50, 0.72)]}  # 50%: seed 0 only
    rows, lines = b.across_seeds(by_seed)
    assert [(r["plan"], r["recipe"]) for r in rows] == [(b.BLOCK_90.label(), "fixed"), (b.BLOCK_90.label(), "gradual")]
    assert rows[1] == {"plan": b.BLOCK_90.label(), "recipe": "gradual", "lee_seed0": 0.51, "lee_seed1": 0.59,
                       "lee_mean": 0.55, "lee_sd": 0.04, "probe_seed0": 0.66, "probe_seed1": 0.62, "probe_mean": 0.64,
                       "probe_sd": 0.02}
    assert lines[0] == "32x1 at 50%: not run"  # not stored at every seed: no mean
    assert lines[1] == "32x1 at 90%: best recipe gradual Lee 0.550 vs fixed 0.490: +0.060 (target >= +0.05): met"
    by_seed = {s: [run(b.NM_24, "sr-ste", 0.70, 0.7), run(b.NM_24, "mask-decay", 0.70 + s / 100, 0.7)] for s in (0, 1)}
    assert "+0.005 (ties with sr-ste (within 0.01, means of 2 seeds each))" in b.across_seeds(by_seed)[1][2]


def test_bad_recover_input_is_one_line(cli):
    for args, expected in ((["--recipe", "nope"], "valid recipes"), (["--steps", "-3"], "steps must be"),
                           (["--lengths", "short"], "valid: mixed, fixed"),
                           (["--train-seed", "-1"], "non-negative integer"),
                           (["--recipe", "structure-decay", "--steps", "2", "--train-batch", "1", "--seq-len", "8"],
                            "N:M")):
        out = cli(["recover", *args])
        assert out.returncode == 2 and expected in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    for args, expected in ((["--probe-lr", "fast"], "--probe-lr takes comma-separated numbers"),
                           (["--probe-lr", "1e-3", "--probe-loss", "kl"], "valid losses"),
                           (["--probe-group-lasso", "-1"], "group_lasso"),
                           (["--probe-group-lasso", "1e-4", "--probe-lr", "1e-3"], "one knob at a time"),
                           (["--probe-decay-fraction", "0.95"], "decay_fraction must be"),
                           (["--code", "abc"], "use it with --stored"), (["--stored", "--code", ""], "non-empty"),
                           (["--stored", "--probe-lr", "1e-3"], "one or the other"),
                           (["--lengths", "short"], "valid: mixed, fixed"),
                           (["--train-seed", "x"], "non-negative integer"),
                           (["--across-seeds", "0,1", "--probe-lr", "1e-3"], "leave out --across-seeds"),
                           (["--stored", "--across-seeds", "0"], "two or more distinct"),
                           (["--stored", "--across-seeds", "1,1"], "two or more distinct"),
                           (["--stored", "--across-seeds", "0,-1"], "non-negative integer"),
                           (["--stored", "--across-seeds", "0,1", "--train-seed", "1"], "leave out --train-seed")):
        out = cli(["bench-recovery", *args])
        assert out.returncode == 2 and expected in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_bench_verdicts_name_a_recipe_that_meets_both_targets_and_call_small_gaps_ties():
    from types import SimpleNamespace

    from sparsity_app.bench import recovery as b

    def run(plan, recipe, lee, probe):
        return SimpleNamespace(request=RecoveryRequest(plan=plan, recipe=recipe), steps_done=300, resumed_from=0,
                               wall_s=400.0, eval_s=10.0, metrics_after={"lee_pearson": lee, "polarity_probe_acc": probe})

    lines = b.verdicts([run(b.BLOCK_50, "fixed", 0.69, 0.68), run(b.BLOCK_50, "mask-decay", 0.66, 0.71),
                        run(b.BLOCK_90, "fixed", 0.30, 0.6), run(b.BLOCK_90, "gradual", 0.36, 0.6),
                        run(b.NM_24, "sr-ste", 0.660, 0.7), run(b.NM_24, "mask-decay", 0.665, 0.7)],
                       [("unstructured", 0.58, 0.65)])
    assert lines[0].startswith("32x1 at 50%, best recipe mask-decay: Lee 0.660") and ": met;" in lines[0]
    assert "fixed: Lee 0.690, probe 0.680" in lines[0]  # the best Lee, which misses the probe, is still shown
    assert "best recipe gradual Lee 0.360 vs fixed 0.300: +0.060" in lines[1] and lines[1].endswith("met")
    assert "ties with sr-ste" in lines[2] and "structure-decay Lee not run" in lines[3]
    assert lines[4] == "32x1 at 90% from sparsegpt: not run"
    assert "wanda Lee 0.650 vs magnitude 0.580: +0.070" in lines[5]
    assert "met by 6 of 6" in lines[-1]  # 410 s each
    missed = b.verdicts([run(b.BLOCK_50, "fixed", 0.69, 0.68)], [])
    assert missed[0].endswith("MISSED") and "not run" in missed[1]


def test_probe_spread_keeps_the_metric_protocol_at_its_fold_assignment():
    """bench-recovery's fold-assignment spread re-runs the polarity probe; at random_state 0 it must be the metric."""
    from sparsity_app.bench.recovery import probe_spread

    dense = probe_spread(None, assignments=5)
    assert dense["draw0"] == pytest.approx(0.745, abs=1e-9)  # metrics.polarity_probe_acc of the dense MiniLM
    assert dense["min"] <= dense["draw0"] <= dense["max"] and dense["min"] < dense["max"] and dense["sd"] > 0


def test_stored_runs_never_mix_code_versions_and_can_be_asked_for_one():
    from types import SimpleNamespace

    from sparsity_app.bench.recovery import requests, stored_runs
    from sparsity_app.measure.timing import fingerprint

    todo = requests(300)
    here = {k: v for k, v in fingerprint().items() if k != "code"}

    def result(i, code):
        return SimpleNamespace(request=resolve.recovery(todo[i]).request, machine={**here, "code": code})

    elsewhere = SimpleNamespace(request=resolve.recovery(todo[3]).request, machine={**here, "cpu": "another CPU", "code": "bbb1"})
    store = SimpleNamespace(recoveries=lambda: iter([result(0, "aaa1"), result(1, "aaa1"), result(2, "bbb1"), elsewhere]))
    runs, code = stored_runs(todo, store)
    assert code == "aaa1" and [r.request for r in runs] == [resolve.recovery(todo[0]).request, resolve.recovery(todo[1]).request]
    runs, code = stored_runs(todo, store, "bbb")
    assert code == "bbb1" and [r.request for r in runs] == [resolve.recovery(todo[2]).request]  # never another machine's
    assert stored_runs(todo, store, "ccc") == ([], None)
    store = SimpleNamespace(recoveries=lambda: iter([result(0, "aaa1"), result(1, "aaa2")]))
    with pytest.raises(UserError, match="ambiguous: aaa1, aaa2"):
        stored_runs(todo, store, "aaa")
