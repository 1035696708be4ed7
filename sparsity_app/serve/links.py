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
from sparsity_app.core.requests import (ModelPlan, RecoveryRequest, ResolvedPlan, ResolvedRecovery, ResolvedSpec, Spec,
                                        fmt_block, parse_block, parse_nm)
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
    "seed": int,  # random's pattern, sparsegpt's calibration draw; left out of a link at 0
    "precision": str,  # left out of a link at fp32
    "tokens": int,
}


MAX_VALUE_CHARS = 2000  # the longest value a link parameter may have (overrides are the longest: ~40 per line)


def _from_query(query: Mapping[str, str], parsers: dict, default, check, show,
                also: Iterable[str] = ()) -> tuple[object, list[str]]:
    """Apply each parameter of `query` named in `parsers` to `default` in order; one whose value does not
    parse or fails `check(candidate)` is skipped with a note (`show(current, name)` says what is kept).

    A link whose every value parses is checked once, whole; only a link that fails that check is checked
    parameter by parameter, to say which value is wrong.
    """
    notes = unknown_notes(query, [*parsers, *also])  # `also`: read by another part of the page
    values: dict[str, object] = {}
    for name, parse in parsers.items():
        if name not in query:
            continue
        raw = query[name]
        try:
            values[name] = _parse(name, raw, parse)
        except (UserError, ValueError, OverflowError) as e:
            notes.append(_ignored(name, raw, e, show(default, name)))
    if not values:
        return default, notes
    try:
        return check(default, None, dataclasses.replace(default, **values)), notes
    except (UserError, ValueError, OverflowError, TypeError):
        pass
    current = default
    for name, value in values.items():
        try:
            current = check(current, name, dataclasses.replace(current, **{name: value}))
        except (UserError, ValueError, OverflowError, TypeError) as e:
            notes.append(_ignored(name, query[name], e, show(current, name)))
    return current, notes


def _parse(name: str, raw: str, parse: Callable[[str], object]) -> object:
    if len(raw) > MAX_VALUE_CHARS:  # no parameter needs more; a longer one only costs time to refuse
        raise UserError(f"longer than {MAX_VALUE_CHARS} characters")
    value = parse(raw)
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number")
    return value


def _ignored(name: str, raw: str, error: Exception, kept: str) -> str:
    return escape(f"ignored {name}={_quote(raw)} from the link ({one_line(error, 160)}); using {kept}")


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


def spec_from_query(query: Mapping[str, str], default: Spec = Spec(),
                    resolver: Callable[[Spec], ResolvedSpec] = resolve.layer) -> tuple[Spec, list[str]]:
    """(spec, notes): every valid parameter applied, every invalid one replaced by its default.

    resolver: what checks a candidate (a page passes its memoised resolve.layer)."""
    def check(spec: Spec, name: str | None, candidate: Spec) -> Spec:
        if candidate.model != spec.model and (name == "model" or candidate.layer == spec.layer):
            # another model and no layer of its own: the default layer may not exist there
            candidate = dataclasses.replace(candidate, layer=get_model(candidate.model).layers()[0].name)
        resolver(candidate)
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
    """The link of a Spec: its one serialised form (`Spec.to_dict`), the parameters `spec_from_query` reads."""
    return _query_of(spec.to_dict(), _PARSERS)


def _query_of(fields: dict, parsers: dict) -> dict[str, str]:
    """A request's `to_dict` as link parameters: the fields `parsers` reads back, as text; none left out
    but those without a value (nm None, no overrides)."""
    def text(value) -> str:
        return ";".join(value) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)

    return {name: text(fields[name]) for name in parsers
            if fields.get(name) not in (None, []) and not (name == "seed" and fields[name] == 0)
            and not (name == "precision" and fields[name] == "fp32")}


_PLAN_PARSERS: dict[str, Callable[[str], object]] = {  # in the order they are applied
    "model": str,
    "nm": parse_nm,
    "method": str,
    "block": parse_block,
    "sparsity": float,
    "seed": int,
    "precision": str,  # left out of a link at fp32
    "tokens": int,
    "batch": int,
    "threads": int,
    "repeat": int,
    "overrides": lambda text: tuple(o for o in text.split(";") if o.strip()),
}


def plan_from_query(query: Mapping[str, str], default: ModelPlan = ModelPlan(), also: Iterable[str] = ("job",),
                    resolver: Callable[[ModelPlan], ResolvedPlan] = resolve.plan) -> tuple[ModelPlan, list[str]]:
    """(plan, notes): every valid parameter applied, every invalid one replaced by its default.

    also: parameters the page reads elsewhere (the job panel's `job`, the recovery's), never "unknown".
    resolver: what checks a candidate (a page passes its memoised resolve.plan).
    """
    def check(plan: ModelPlan, name: str | None, candidate: ModelPlan) -> ModelPlan:
        resolver(candidate)
        return candidate

    return _from_query(query, _PLAN_PARSERS, default, check, _show, also)


def plan_to_query(plan: ModelPlan) -> dict[str, str]:
    """The link of a ModelPlan: its one serialised form (`ModelPlan.to_dict`), the parameters `plan_from_query` reads."""
    return _query_of(plan.to_dict(), _PLAN_PARSERS)


_RECOVERY_PARSERS: dict[str, Callable[[str], object]] = {"recipe": str, "steps": int, "batch": int, "seq_len": int,
                                                         "lengths": str}
_RECOVERY_QUERY = {"recipe": "recipe", "steps": "steps", "batch": "train_batch", "seq_len": "seq_len",
                   "lengths": "lengths"}  # field -> parameter


def recovery_from_query(query: Mapping[str, str], plan: ModelPlan,
                        resolver: Callable[[RecoveryRequest], ResolvedRecovery] = resolve.recovery):
    """(RecoveryRequest of `plan`, notes): the link's recipe and steps, each invalid one replaced
    by its default with a note. resolver: what checks a candidate (a page passes its memoised one)."""
    def check(request, name: str | None, candidate):
        r = resolver(candidate).request
        limits.current().check_recovery(r.steps * r.batch * r.seq_len)
        return candidate

    def show(request, name: str) -> str:
        return f"{name} {getattr(request, name)}"

    try:
        default = resolver(RecoveryRequest(plan=plan)).request
    except UserError:  # the plan cannot be recovered (e.g. synthetic weights): the page says why
        return RecoveryRequest(plan=plan), []
    renamed = {field: query[param] for field, param in _RECOVERY_QUERY.items() if param in query}
    return _from_query(renamed, _RECOVERY_PARSERS, default, check, show)


RECOVERY_PARAMETERS = tuple(_RECOVERY_QUERY.values())  # the link parameters recovery_from_query reads


def recovery_to_query(request) -> dict[str, str]:
    """The plan's parameters and the recovery's (its batch is `train_batch`: `batch` is the plan's)."""
    return {**plan_to_query(request.plan), **{param: str(getattr(request, field)) for field, param in _RECOVERY_QUERY.items()}}
