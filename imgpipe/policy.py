"""Verdict policies: ordered rules over stage outputs -> the most severe verdict.

A rule reads one field of one stage's output (dotted path, checked against the stage
kind's schema in imgpipe/stageoutputs.py when the pipeline is loaded), compares it with a
value and, when it matches, proposes a verdict. The job's verdict is the most severe proposal;
each matching rule adds a reason such as ``quality.score=22.5 < 25 -> fail``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from imgpipe.errors import PipelineSpecError
from imgpipe.stageoutputs import field_problem

__all__ = [
    "VOCABULARIES",
    "Policy",
    "Rule",
    "RuleCheck",
    "evaluate_policy",
    "explain_rules",
    "parse_policy",
]

VOCABULARIES: dict[str, tuple[str, ...]] = {
    # least -> most severe
    "qc": ("pass", "review", "fail"),
    "moderation": ("allow", "review", "block"),
}

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class Rule:
    stage: str
    field: str
    op: str
    value: Any
    verdict: str

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "field": self.field,
            "op": self.op,
            "value": self.value,
            "verdict": self.verdict,
        }


@dataclass(frozen=True)
class Policy:
    vocabulary: str
    rules: tuple[Rule, ...]
    on_gate: str

    @property
    def verdicts(self) -> tuple[str, ...]:
        return VOCABULARIES[self.vocabulary]

    @property
    def default(self) -> str:
        return self.verdicts[0]

    def severity(self, verdict: str) -> int:
        return self.verdicts.index(verdict)

    def to_json(self) -> dict[str, Any]:
        return {
            "vocabulary": self.vocabulary,
            "on_gate": self.on_gate,
            "rules": [r.to_json() for r in self.rules],
        }


def parse_policy(
    pipeline: str, raw: object, stage_kinds: Mapping[str, str], *, check_fields: bool = True
) -> Policy:
    """The policy of ``pipeline`` from its TOML table. ``stage_kinds``: stage name -> kind;
    with ``check_fields`` each rule's field must exist in its stage kind's output schema."""

    def err(where: str, message: str) -> PipelineSpecError:
        return PipelineSpecError(f"pipeline {pipeline!r}: policy.{where}: {message}")

    if not isinstance(raw, Mapping):
        raise err("", "must be a table")
    unknown = set(raw) - {"vocabulary", "rules", "on_gate"}
    if unknown:
        raise err(sorted(unknown)[0], "unknown key (allowed: vocabulary, rules, on_gate)")
    vocabulary = raw.get("vocabulary", "qc")
    if vocabulary not in VOCABULARIES:
        raise err("vocabulary", f"{vocabulary!r} is not one of {', '.join(VOCABULARIES)}")
    verdicts = VOCABULARIES[vocabulary]
    on_gate = raw.get("on_gate", verdicts[-1])
    if on_gate not in verdicts:
        raise err("on_gate", f"{on_gate!r} is not one of {', '.join(verdicts)}")
    raw_rules = raw.get("rules", [])
    if not isinstance(raw_rules, list):
        raise err("rules", "must be an array of tables")
    rules: list[Rule] = []
    for i, r in enumerate(raw_rules):
        where = f"rules[{i}]"
        if not isinstance(r, Mapping):
            raise err(where, "must be a table")
        missing = {"stage", "field", "op", "value", "verdict"} - set(r)
        if missing:
            raise err(where, f"missing {', '.join(sorted(missing))}")
        extra = set(r) - {"stage", "field", "op", "value", "verdict"}
        if extra:
            raise err(f"{where}.{sorted(extra)[0]}", "unknown key")
        if r["stage"] not in stage_kinds:
            raise err(f"{where}.stage", f"unknown stage {r['stage']!r}")
        problem = field_problem(stage_kinds[r["stage"]], str(r["field"]))
        if check_fields and problem is not None:
            raise err(f"{where}.field", problem)
        if r["op"] not in _OPS:
            raise err(f"{where}.op", f"{r['op']!r} is not one of {' '.join(_OPS)}")
        if r["verdict"] not in verdicts:
            raise err(f"{where}.verdict", f"{r['verdict']!r} is not one of {', '.join(verdicts)}")
        rules.append(
            Rule(str(r["stage"]), str(r["field"]), str(r["op"]), r["value"], str(r["verdict"]))
        )
    return Policy(str(vocabulary), tuple(rules), str(on_gate))


def _lookup(output: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    current: Any = output
    for part in dotted.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return False, None
        current = current[part]
    return True, current


def evaluate_policy(
    policy: Policy,
    outputs: Mapping[str, Mapping[str, Any]],
    *,
    gate_tripped: str | None = None,
) -> tuple[str, list[str]]:
    """Verdict and reasons from the succeeded stages' outputs.

    ``gate_tripped``: the reason a gate stage stopped the pipeline, if it did.
    """
    verdict = policy.default
    reasons: list[str] = []
    if gate_tripped is not None:
        verdict = policy.on_gate
        reasons.append(f"quality_gate: {gate_tripped} -> {policy.on_gate}")
    for rule in policy.rules:
        output = outputs.get(rule.stage)
        if output is None:
            continue
        found, value = _lookup(output, rule.field)
        if not found:
            continue
        try:
            matched = _OPS[rule.op](value, rule.value)
        except TypeError:
            continue
        if matched:
            shown = f"{value:.4g}" if isinstance(value, float) else repr(value)
            reasons.append(
                f"{rule.stage}.{rule.field}={shown} {rule.op} {rule.value!r} -> {rule.verdict}"
            )
            if policy.severity(rule.verdict) > policy.severity(verdict):
                verdict = rule.verdict
    return verdict, reasons


@dataclass(frozen=True)
class RuleCheck:
    """One rule against one job's outputs: the value it read and whether it matched (what
    a reviewer sees as the deciding scores and thresholds)."""

    rule: Rule
    found: bool
    value: Any
    matched: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.rule.to_json(), "found": self.found, "actual": self.value,
                "matched": self.matched}  # fmt: skip


def explain_rules(
    rules: list[Mapping[str, Any]], outputs: Mapping[str, Mapping[str, Any]]
) -> list[RuleCheck]:
    """Each rule of a stored policy (``Policy.to_json()["rules"]``) checked against the
    stage outputs, in the policy's order, as ``evaluate_policy`` checks them."""
    checks: list[RuleCheck] = []
    for raw in rules:
        rule = Rule(
            str(raw["stage"]), str(raw["field"]), str(raw["op"]), raw["value"], str(raw["verdict"])
        )
        output = outputs.get(rule.stage)
        found, value = _lookup(output, rule.field) if output is not None else (False, None)
        matched = False
        if found and rule.op in _OPS:
            try:
                matched = bool(_OPS[rule.op](value, rule.value))
            except TypeError:
                matched = False
        checks.append(RuleCheck(rule, found, value, matched))
    return checks
