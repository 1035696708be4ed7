"""A view's configuration <-> URL query parameters, so a link reproduces the view.

A link is untrusted input: each parameter is parsed by a fixed parser and checked against the known
models, layers, methods, ranges and this server's limits; one that is invalid falls back to its
default, with a note saying so, and one the page does not read is ignored with a note. No value
becomes a path, an import or code. Notes quote the link's text cut short and escaped for Markdown
(the app shows them as Markdown), so a link cannot put a working link or markup on the page.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable, Mapping

from sparsity_app.core import limits
from sparsity_app.core.errors import UserError, one_line
from sparsity_app.core.requests import ModelPlan, RecoveryRequest, Spec, fmt_block, parse_block, parse_nm
from sparsity_app.model.catalog import get_model
from sparsity_app.runs import resolve

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


MAX_VALUE_CHARS = 2000  # the longest value a link parameter may have (overrides are the longest: ~40 per line)


def _from_query(query: Mapping[str, str], parsers: dict, default, check, show,
                also: Iterable[str] = ()) -> tuple[object, list[str]]:
    """Apply each parameter of `query` named in `parsers` to `default` in order; one whose value does not
    parse or fails `check(candidate)` is skipped with a note (`show(current, name)` says what is kept)."""
    current, notes = default, unknown_notes(query, [*parsers, *also])  # `also`: read by another part of the page
    for name, parse in parsers.items():
        if name not in query:
            continue
        raw = query[name]
        try:
            if len(raw) > MAX_VALUE_CHARS:  # no parameter needs more; a longer one only costs time to refuse
                raise UserError(f"longer than {MAX_VALUE_CHARS} characters")
            value = parse(raw)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{name} must be a finite number")
            candidate = check(current, name, dataclasses.replace(current, **{name: value}))
        except (UserError, ValueError, OverflowError) as e:
            notes.append(escape(f"ignored {name}={_quote(raw)} from the link ({one_line(e, 160)}); "
                                f"using {show(current, name)}"))
            continue
        current = candidate
    return current, notes


def unknown_notes(query: Mapping[str, str], known: Iterable[str]) -> list[str]:
    """One note per parameter of `query` that the page does not read (at most 5, then a count)."""
    unknown = [name for name in query if name not in set(known)]
    notes = [escape(f"ignored {_quote(name, 40)} from the link: this page reads no parameter of that name")
             for name in unknown[:5]]
    if len(unknown) > 5:
        notes.append(f"ignored {len(unknown) - 5} more unknown parameters from the link")
    return notes


def _quote(text: object, limit: int = 60) -> str:
    """repr of a link's text, cut to about `limit` characters."""
    text = str(text)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+!|~$:.-])")


def escape(text: str) -> str:
    """`text` with every Markdown (and HTML) special character backslash-escaped: shown as typed."""
    return _MARKDOWN.sub(r"\\\1", text)


def spec_from_query(query: Mapping[str, str], default: Spec = Spec()) -> tuple[Spec, list[str]]:
    """(spec, notes): every valid parameter applied, every invalid one replaced by its default."""
    def check(spec: Spec, name: str, candidate: Spec) -> Spec:
        if name == "model" and candidate.model != spec.model:  # the default layer may not exist there

            candidate = dataclasses.replace(candidate, layer=get_model(candidate.model).layers()[0].name)
        resolve.layer(candidate)
        limits.current().check_tokens(candidate.tokens)
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


def plan_from_query(query: Mapping[str, str], default: ModelPlan = ModelPlan(),
                    also: Iterable[str] = ("job",)) -> tuple[ModelPlan, list[str]]:
    """(plan, notes): every valid parameter applied, every invalid one replaced by its default.

    also: parameters the page reads elsewhere (the job panel's `job`, the recovery's), never "unknown".
    """
    def check(plan: ModelPlan, name: str, candidate: ModelPlan) -> ModelPlan:
        resolve.plan(candidate)
        return candidate

    return _from_query(query, _PLAN_PARSERS, default, check, _show, also)


def plan_to_query(plan: ModelPlan) -> dict[str, str]:
    q = {"model": plan.model, "method": plan.method, "block": fmt_block(plan.block), "sparsity": f"{plan.sparsity:g}",
         "tokens": str(plan.tokens), "batch": str(plan.batch), "threads": str(plan.threads), "repeat": str(plan.repeat)}
    if plan.nm is not None:
        q["nm"] = f"{plan.nm[0]}:{plan.nm[1]}"
    if plan.overrides:
        q["overrides"] = ";".join(plan.overrides)
    return q


_RECOVERY_PARSERS: dict[str, Callable[[str], object]] = {"recipe": str, "steps": int, "batch": int, "seq_len": int,
                                                         "lengths": str}
_RECOVERY_QUERY = {"recipe": "recipe", "steps": "steps", "batch": "train_batch", "seq_len": "seq_len",
                   "lengths": "lengths"}  # field -> parameter


def recovery_from_query(query: Mapping[str, str], plan: ModelPlan):
    """(recovery.RecoveryRequest of `plan`, notes): the link's recipe and steps, each invalid one replaced
    by its default with a note."""
    def check(request, name: str, candidate):
        r = resolve.recovery(candidate)[0]
        limits.current().check_recovery(r.steps * r.batch * r.seq_len)
        return candidate

    def show(request, name: str) -> str:
        return f"{name} {getattr(request, name)}"

    try:
        default = resolve.recovery(RecoveryRequest(plan=plan))[0]
    except UserError:  # the plan cannot be recovered (e.g. synthetic weights): the page says why
        return RecoveryRequest(plan=plan), []
    renamed = {field: query[param] for field, param in _RECOVERY_QUERY.items() if param in query}
    return _from_query(renamed, _RECOVERY_PARSERS, default, check, show)


RECOVERY_PARAMETERS = tuple(_RECOVERY_QUERY.values())  # the link parameters recovery_from_query reads


def recovery_to_query(request) -> dict[str, str]:
    """The plan's parameters and the recovery's (its batch is `train_batch`: `batch` is the plan's)."""
    return {**plan_to_query(request.plan), **{param: str(getattr(request, field)) for field, param in _RECOVERY_QUERY.items()}}
