"""A view's configuration <-> URL query parameters, so a link reproduces the view.

Each parameter that is invalid falls back to its default, with a note saying so.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from .errors import UserError
from .spec import ModelPlan, Spec, fmt_block, parse_block, parse_nm

_PARSERS: dict[str, Callable[[str], object]] = {  # in the order they are applied
    "model": str,
    "layer": str,
    "nm": parse_nm,  # before method: method=nm is only valid once the pattern is known
    "method": str,
    "block": parse_block,
    "sparsity": float,
    "norm": str,
    "tokens": int,
}


def _from_query(query: Mapping[str, str], parsers: dict, default, check, show) -> tuple[object, list[str]]:
    """Apply each parameter of `query` named in `parsers` to `default` in order; one whose value does not
    parse or fails `check(candidate)` is skipped with a note (`show(current, name)` says what is kept)."""
    current, notes = default, []
    for name, parse in parsers.items():
        if name not in query:
            continue
        raw = query[name]
        try:
            candidate = dataclasses.replace(current, **{name: parse(raw)})
            candidate = check(current, name, candidate)
        except (UserError, ValueError) as e:
            notes.append(f"ignored {name}={raw!r} from the link ({e}); using {show(current, name)}")
            continue
        current = candidate
    return current, notes


def spec_from_query(query: Mapping[str, str], default: Spec = Spec()) -> tuple[Spec, list[str]]:
    """(spec, notes): every valid parameter applied, every invalid one replaced by its default."""
    from .experiment import validate

    def check(spec: Spec, name: str, candidate: Spec) -> Spec:
        if name == "model" and candidate.model != spec.model:  # the default layer may not exist there
            from .models import get_model

            candidate = dataclasses.replace(candidate, layer=get_model(candidate.model).layers()[0].name)
        validate(candidate)
        return candidate

    return _from_query(query, _PARSERS, default, check, _show)


def _show(spec: Spec, name: str) -> str:
    value = getattr(spec, name)
    if name == "block":
        return fmt_block(value)
    if name == "nm":
        return "no N:M" if value is None else f"{value[0]}:{value[1]}"
    if name == "overrides":
        return "; ".join(value) or "no overrides"
    return str(value)


def spec_to_query(spec: Spec) -> dict[str, str]:
    q = {"model": spec.model, "layer": spec.layer, "method": spec.method, "block": fmt_block(spec.block),
         "sparsity": f"{spec.sparsity:g}", "norm": spec.norm, "tokens": str(spec.tokens)}
    if spec.nm is not None:
        q["nm"] = f"{spec.nm[0]}:{spec.nm[1]}"
    return q


_PLAN_PARSERS: dict[str, Callable[[str], object]] = {  # in the order they are applied
    "model": str,
    "nm": parse_nm,
    "method": str,
    "block": parse_block,
    "sparsity": float,
    "tokens": int,
    "batch": int,
    "threads": int,
    "repeat": int,
    "overrides": lambda text: tuple(o for o in text.split(";") if o.strip()),
}


def plan_from_query(query: Mapping[str, str], default: ModelPlan = ModelPlan()) -> tuple[ModelPlan, list[str]]:
    """(plan, notes): every valid parameter applied, every invalid one replaced by its default."""
    from .model_experiment import validate

    def check(plan: ModelPlan, name: str, candidate: ModelPlan) -> ModelPlan:
        validate(candidate)
        return candidate

    return _from_query(query, _PLAN_PARSERS, default, check, _show)


def plan_to_query(plan: ModelPlan) -> dict[str, str]:
    q = {"model": plan.model, "method": plan.method, "block": fmt_block(plan.block), "sparsity": f"{plan.sparsity:g}",
         "tokens": str(plan.tokens), "batch": str(plan.batch), "threads": str(plan.threads), "repeat": str(plan.repeat)}
    if plan.nm is not None:
        q["nm"] = f"{plan.nm[0]}:{plan.nm[1]}"
    if plan.overrides:
        q["overrides"] = ";".join(plan.overrides)
    return q


def plan_to_command(plan: ModelPlan, command: str = "model") -> str:
    """The CLI line that runs `plan`: `python -m sparsity_app model --model ... --override ...` (shell-quoted)."""
    import shlex

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
