"""recover(request) -> RecoveryResult: fine-tune a pruned model toward the dense one, scored before and after.

The recipes are accuracy.recipes', the training loop accuracy.recovery's; this is the run around
them: resolve, the stored result or the measurement slot (a run fills both cores for minutes),
one-shot masks, scoring before, training (checkpointed, resumable), scoring after, store.
"""
from __future__ import annotations

import shutil
import time

from sparsity_app.core import limits
from sparsity_app.core.requests import RecoveryRequest, ResolvedRecovery, Spec, default_threads
from sparsity_app.core.results import RecoveryResult
from sparsity_app.measure.locks import measurement_slot
from sparsity_app.measure.timing import code_version, fingerprint
from sparsity_app.model.catalog import get_model
from sparsity_app.model.pruned import pruned_weights
from sparsity_app.runs import resolve
from sparsity_app.runs.pipeline import Progress, cached_or_run, quiet

STEPS = ("prune", "train", "evaluate")  # what `progress` is told, in order
# The modules that decide recovered weights and their scores; a kernel or UI change keeps stored recoveries.
RECOVERY_SOURCES = ("accuracy/recipes.py", "accuracy/recovery.py", "runs/recover.py", "prune/methods.py", "model/catalog.py",
                    "model/pruned.py", "model/hf.py", "model/data.py", "accuracy/metrics.py", "core/requests.py",
                    "runs/resolve.py")


def recovery_code() -> str:
    """The hash of RECOVERY_SOURCES: the `code` of a recovery's machine (measure.timing.code_version)."""
    return code_version(RECOVERY_SOURCES)


def recovery_machine() -> dict:
    """What a recovery's key holds of the machine: its fingerprint, with the training code's hash as `code`."""
    return {**fingerprint(), "code": recovery_code()}


def lookup(request: RecoveryRequest | ResolvedRecovery, store) -> RecoveryResult | None:
    """The stored result of the request, or None; never trains."""
    return store.get_recovery(_resolved(request).request.key(recovery_machine()))


def _resolved(request: RecoveryRequest | ResolvedRecovery) -> ResolvedRecovery:
    """What a door resolved, as it is; a RecoveryRequest (the Python API's) resolved here."""
    return request if isinstance(request, ResolvedRecovery) else resolve.recovery(request)


def recover(request: RecoveryRequest | ResolvedRecovery, store=None, progress: Progress = quiet,
            time_limit_s: float | None = None) -> RecoveryResult:
    """Fine-tune the plan's pruned model with the request's recipe; score it before and after.

    request: what a door resolved (runs.resolve.recovery), or a RecoveryRequest, resolved here.
    With a store: a stored result returns at once (cached=True), checkpoints and the recovered
    weights (`Store.recovered_weights`) live under it, and a stopped run resumes. The run holds
    the machine's measurement slot: it fills both cores for minutes and would skew any timing.
    Raises RecoveryStopped when `time_limit_s` (of this call's training) runs out.
    """
    resolved = _resolved(request)
    req, specs = resolved.request, resolved.plan.specs
    limits.current().check_recovery(req.steps * req.batch * req.seq_len)
    if time_limit_s is None:
        time_limit_s = limits.current().recover_timeout_s or None
    machine = recovery_machine()
    key = req.key(machine)
    return cached_or_run(f"recover {req.label()}", None if store is None else lambda: store.get_recovery(key),
                         lambda: _recover(req, specs, key, machine, store, progress, time_limit_s),
                         measurement_slot, progress, waiting="job(s)")


def _recover(req: RecoveryRequest, specs: dict[str, Spec | None], key: str, machine: dict, store, progress: Progress,
             time_limit_s: float | None) -> RecoveryResult:
    # lazy: PyTorch loads only to train and score; a stored recovery is read without it
    import torch

    from sparsity_app.accuracy import metrics, recovery  # lazy, as torch above

    torch.set_num_threads(default_threads())
    model = get_model(req.plan.model)
    progress("prune", f"{req.plan.label()}: one-shot masks of {len(specs)} linears, and their score before recovery")
    start_eval = time.perf_counter()
    _, one_shot = pruned_weights(req.plan.model, specs, lambda line: progress("prune", line))
    dense_embeddings = metrics.reference_embeddings(req.plan.model)
    before = metrics.evaluate(model.pruned_copy(one_shot), model.tokenizer(), dense_embeddings)
    eval_s = time.perf_counter() - start_eval

    checkpoint = None if store is None else store.recovery_checkpoint(key)
    weights, masks, steps_done, wall_s, losses, resumed_from = recovery.train(
        req, specs, checkpoint, progress, time_limit_s, one_shot)

    progress("evaluate", "real-label metrics of the recovered model")
    start_eval = time.perf_counter()
    after = metrics.evaluate(model.pruned_copy(weights), model.tokenizer(), dense_embeddings)
    eval_s += time.perf_counter() - start_eval
    total = sum(m.size for m in masks.values())
    result = RecoveryResult(
        request=req, steps_done=steps_done, wall_s=round(wall_s, 2), loss=losses, metrics_before=before,
        metrics_after=after, dense_metrics=dict(metrics.dense_metrics(req.plan.model)),
        sparsity_achieved=float(sum((w == 0).sum() for w in weights.values()) / total), resumed_from=resumed_from,
        eval_s=round(eval_s, 2), machine=machine, key=key)
    if store is not None:
        store.put_recovery(key, result, weights, masks)  # weights first, then the entry that points at them
        if checkpoint is not None:
            shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return result
