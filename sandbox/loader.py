"""Read a TOML policy file (and what it includes) into a validated Policy, or raise PolicyError with FILE:LINE.

File layout (docs/SANDBOX.md is the reference):

    [policy]                      default_action, description, include, log_denials, runtime_constants
    [constants]                   NAME = int or "A|B" expression
    [[rule]]                      syscalls = [...], action = "...", args = [{index, op, value, mask}], comment
"""
from __future__ import annotations

import importlib.resources
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyseccomp

from .constants import BUILTIN_RUNTIME_CONSTANTS, NAMED_CONSTANTS, to_u64
from .errors import PolicyError
from .overlap import rules_disjoint
from .policy import Action, ArgCondition, ComparisonOp, Operand, Policy, RuntimeConstant, SyscallRule
from .source import PolicySource, Span

_POLICY_KEYS = {"default_action", "description", "include", "log_denials", "runtime_constants"}
_RULE_KEYS = {"syscalls", "action", "args", "comment"}
_ARG_KEYS = {"index", "op", "value", "mask"}
_TOP_KEYS = {"policy", "constants", "rule"}
_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_SHIPPED_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SYSCALL_UNKNOWN = -1  # libseccomp's __NR_SCMP_ERROR; names of other architectures' syscalls resolve to < -1
_MAX_SYSCALL_ARGS = 6


def shipped_policy_dir() -> Path:
    """The directory holding the policies shipped as package data (`openinfer.policies`)."""
    try:
        return Path(str(importlib.resources.files("openinfer.policies")))
    except ModuleNotFoundError:
        # An editable install made before `policies/` was mapped has no openinfer.policies; the source tree does.
        return Path(__file__).resolve().parent.parent / "policies"


def resolve_policy_path(name_or_path: str | os.PathLike[str], relative_to: Path | None = None) -> Path:
    """A bare name ("worker") means the shipped policies/worker.toml; anything else is a file path."""
    text = os.fspath(name_or_path)
    if not isinstance(name_or_path, os.PathLike) and _SHIPPED_NAME.match(text):
        return shipped_policy_dir() / f"{text}.toml"
    path = Path(text).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    return path


def load_policy(name_or_path: str | os.PathLike[str]) -> Policy:
    """Load and validate a policy; raises PolicyError naming the file and line of the first problem."""
    return _read_file(resolve_policy_path(name_or_path), chain=())


@dataclass
class _FileContents:
    """What one file declares, before its include is merged in."""

    default_action: Action | None = None
    description: str | None = None
    log_denials: bool | None = None
    runtime_constants: set[str] = field(default_factory=set)
    constants: dict[str, int] = field(default_factory=dict)
    rules: list[SyscallRule] = field(default_factory=list)


def _read_file(path: Path, chain: tuple[Path, ...]) -> Policy:
    """Parse one file; its include recurses through here with the chain of files above it (cycle check)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise PolicyError(chain[-1], None, f"include cycle: {cycle}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = ""
        if path.parent == shipped_policy_dir():
            names = sorted(p.stem for p in shipped_policy_dir().glob("*.toml"))
            hint = f" (shipped policies: {', '.join(names)})"
        raise PolicyError(path, None, f"no such policy file{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(path, None, f"cannot read policy: {exc}") from None
    source = PolicySource(path, text)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+)", str(exc))
        raise source.error(int(match.group(1)) if match else None, f"invalid TOML: {exc}") from None
    return _build(source, document, chain + (resolved,))


def _build(source: PolicySource, document: dict[str, Any], chain: tuple[Path, ...]) -> Policy:
    for key in document:
        if key not in _TOP_KEYS:
            raise source.error(source.line_of_key(key, source.whole), f"unknown top-level key {key!r} (expected one of {sorted(_TOP_KEYS)})")
    settings = _table(source, document, "policy")
    base = _include(source, settings, chain)
    own = _FileContents()
    _read_settings(source, settings, own)
    runtime = frozenset(own.runtime_constants) | (base.runtime_constants if base else frozenset()) | BUILTIN_RUNTIME_CONSTANTS
    inherited = _inherited_constants(base)
    own.constants = _read_constants(source, _table(source, document, "constants"), inherited, runtime)
    names = _Names(local={**inherited, **own.constants}, runtime=runtime)
    raw_rules = document.get("rule", [])
    if not isinstance(raw_rules, list):
        raise source.error(source.line_of_key("rule", source.whole), "'rule' must be an array of tables ([[rule]])")
    for index, raw in enumerate(raw_rules):
        own.rules.extend(_read_rule(source, index, raw, names))
    return _merge(source, own, base)


def _include(source: PolicySource, settings: dict[str, Any], chain: tuple[Path, ...]) -> Policy | None:
    if "include" not in settings:
        return None
    target = settings["include"]
    span = source.table_span("policy")
    if not isinstance(target, str) or not target:
        raise source.error(source.line_of_key("include", span), "include must be a policy name or a path")
    return _read_file(resolve_policy_path(target, relative_to=source.path.parent), chain)


@dataclass(frozen=True)
class _Names:
    local: dict[str, int]  # [constants] of this file and its includes
    runtime: frozenset[str]


def _table(source: PolicySource, document: dict[str, Any], name: str) -> dict[str, Any]:
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise source.error(source.line_of_key(name, source.whole), f"'{name}' must be a table ([{name}])")
    return value


def _read_settings(source: PolicySource, settings: dict[str, Any], own: _FileContents) -> None:
    span = source.table_span("policy")
    for key, value in settings.items():
        line = source.line_of_key(key, span)
        if key not in _POLICY_KEYS:
            raise source.error(line, f"unknown key {key!r} in [policy] (expected one of {sorted(_POLICY_KEYS)})")
        if key == "default_action":
            own.default_action = _action(source, value, line)
        elif key == "description":
            if not isinstance(value, str):
                raise source.error(line, "description must be a string")
            own.description = value
        elif key == "log_denials":
            if not isinstance(value, bool):
                raise source.error(line, "log_denials must be true or false")
            own.log_denials = value
        elif key == "runtime_constants":
            if not isinstance(value, list) or not all(isinstance(v, str) and _NAME.match(v) for v in value):
                raise source.error(line, "runtime_constants must be a list of UPPER_CASE names")
            clashes = [v for v in value if v in NAMED_CONSTANTS]
            if clashes:
                raise source.error(line, f"runtime constant {clashes[0]!r} shadows a named constant")
            own.runtime_constants = set(value)


def _inherited_constants(base: Policy | None) -> dict[str, int]:
    return dict(base.constants) if base else {}


def _read_constants(source: PolicySource, table: dict[str, Any], inherited: dict[str, int], runtime: frozenset[str]) -> dict[str, int]:
    span = source.table_span("constants")
    constants: dict[str, int] = {}
    for name, raw in table.items():
        line = source.line_of_key(name, span)
        if not _NAME.match(name):
            raise source.error(line, f"constant name {name!r} must be UPPER_CASE")
        if name in NAMED_CONSTANTS or name in runtime:
            raise source.error(line, f"constant {name!r} shadows a built-in or runtime constant")
        value = _operand(source, raw, span, _Names(local={**inherited, **constants}, runtime=frozenset()), line)
        assert isinstance(value, int)
        if name in inherited and inherited[name] != value:
            raise source.error(line, f"constant {name!r} redefined with a different value than in the included policy")
        constants[name] = value
    return constants


def _read_rule(source: PolicySource, index: int, raw: Any, names: _Names) -> list[SyscallRule]:
    span = source.table_span("rule", index)
    header = source.header_line(span)
    if not isinstance(raw, dict):
        raise source.error(header, "each rule must be a table")
    for key in raw:
        if key not in _RULE_KEYS:
            raise source.error(source.line_of_key(key, span), f"unknown key {key!r} in [[rule]] (expected one of {sorted(_RULE_KEYS)})")
    for required in ("syscalls", "action"):
        if required not in raw:
            raise source.error(header, f"[[rule]] needs {required!r}")
    if "comment" in raw and not isinstance(raw["comment"], str):
        raise source.error(source.line_of_key("comment", span), "comment must be a string")
    action = _action(source, raw["action"], source.line_of_key("action", span))
    args = _read_args(source, raw.get("args", []), span, names)
    syscalls = raw["syscalls"]
    if not isinstance(syscalls, list) or not syscalls or not all(isinstance(s, str) for s in syscalls):
        raise source.error(source.line_of_key("syscalls", span), "syscalls must be a non-empty list of names")
    rules: list[SyscallRule] = []
    seen: set[str] = set()
    for name in syscalls:
        line = source.line_of_string(name, span)
        if name in seen:
            raise source.error(line, f"syscall {name!r} listed twice in one rule")
        seen.add(name)
        if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) == _SYSCALL_UNKNOWN:
            raise source.error(line, f"unknown syscall {name!r} (libseccomp does not know it)")
        rules.append(SyscallRule(name, action, args, f"{source.path}:{line}", raw.get("comment", "")))
    return rules


def _read_args(source: PolicySource, raw: Any, span: Span, names: _Names) -> tuple[ArgCondition, ...]:
    if not isinstance(raw, list) or not all(isinstance(a, dict) for a in raw):
        raise source.error(source.line_of_key("args", span), "args must be a list of tables like { index = 0, op = \"eq\", value = 1 }")
    conditions: list[ArgCondition] = []
    for entry in raw:
        for key in entry:
            if key not in _ARG_KEYS:
                raise source.error(source.line_of_key(key, span), f"unknown key {key!r} in args (expected one of {sorted(_ARG_KEYS)})")
        line = source.line_of_key("index", span)
        index = entry.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < _MAX_SYSCALL_ARGS:
            raise source.error(line, f"args index must be an integer 0..{_MAX_SYSCALL_ARGS - 1}, got {index!r}")
        if any(c.index == index for c in conditions):
            raise source.error(line, f"argument {index} compared twice in one rule (libseccomp allows one comparison per argument; split the rule)")
        op_text = entry.get("op")
        try:
            op = ComparisonOp(op_text)
        except ValueError:
            op_line = source.line_of_string(str(op_text), span) if isinstance(op_text, str) else source.line_of_key("op", span)
            raise source.error(op_line, f"unknown comparison {op_text!r} (expected one of {[o.value for o in ComparisonOp]})") from None
        if "value" not in entry:
            raise source.error(line, "args entry needs a value")
        value = _operand(source, entry["value"], span, names, source.line_of_key("value", span))
        mask: Operand | None = None
        if op is ComparisonOp.MASKED_EQ:
            if "mask" not in entry:
                raise source.error(line, "masked_eq needs a mask")
            mask = _operand(source, entry["mask"], span, names, source.line_of_key("mask", span))
            if isinstance(mask, int) and isinstance(value, int) and value & ~mask:
                raise source.error(line, f"masked_eq value {value:#x} has bits outside mask {mask:#x}; the rule could never match")
        elif "mask" in entry:
            raise source.error(source.line_of_key("mask", span), f"mask is only meaningful with masked_eq, not {op.value}")
        conditions.append(ArgCondition(index, op, value, mask))
    return tuple(conditions)


def _action(source: PolicySource, raw: Any, line: int | None) -> Action:
    try:
        return Action.parse(raw)
    except ValueError as exc:
        raise source.error(line, str(exc)) from None


def _operand(source: PolicySource, raw: Any, span: Span, names: _Names, line: int | None) -> Operand:
    """An int, or a string: one runtime constant name, or named constants / integers joined with `|`."""
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise source.error(line, f"value must be an integer or a constant name, got {raw!r}")
    if isinstance(raw, int):
        try:
            return to_u64(raw)
        except ValueError as exc:
            raise source.error(line, str(exc)) from None
    terms = [t.strip() for t in raw.split("|")]
    if len(terms) == 1 and terms[0] in names.runtime:
        return RuntimeConstant(terms[0])
    result = 0
    for term in terms:
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|0o[0-7]+|0b[01]+|\d+)", term):
            result |= to_u64(int(term, 0))
        elif term in names.local:
            result |= names.local[term]
        elif term in NAMED_CONSTANTS:
            result |= to_u64(NAMED_CONSTANTS[term])
        elif term in names.runtime:
            raise source.error(source.line_of_word(term, span), f"runtime constant {term!r} cannot be combined with '|'")
        else:
            raise source.error(source.line_of_word(term, span) if term else line, f"unknown constant {term!r}")
    return result


def _merge(source: PolicySource, own: _FileContents, base: Policy | None) -> Policy:
    """Own settings win; own rules for a syscall replace all of the included policy's rules for that syscall."""
    default_action = own.default_action or (base.default_action if base else None)
    if default_action is None:
        raise source.error(source.header_line(source.table_span("policy")), "[policy] needs default_action (or an include that sets it)")
    own_syscalls = {rule.syscall for rule in own.rules}
    inherited = [r for r in base.rules if r.syscall not in own_syscalls] if base else []
    rules = _deduplicated(inherited + own.rules)
    _check_overlaps(source, rules)
    policy = Policy(
        name=source.path.stem,
        path=source.path,
        default_action=default_action,
        rules=tuple(rules),
        description=own.description if own.description is not None else (base.description if base else ""),
        log_denials=own.log_denials if own.log_denials is not None else (base.log_denials if base else False),
        runtime_constants=frozenset(own.runtime_constants | (base.runtime_constants if base else frozenset())),
        included=((base.path, *base.included) if base else ()),
        constants={**_inherited_constants(base), **own.constants},
    )
    return policy


def _deduplicated(rules: list[SyscallRule]) -> list[SyscallRule]:
    seen: set[tuple[str, Action, tuple[ArgCondition, ...]]] = set()
    unique: list[SyscallRule] = []
    for rule in rules:
        key = (rule.syscall, rule.action, rule.args)
        if key not in seen:
            seen.add(key)
            unique.append(rule)
    return unique


def _check_overlaps(source: PolicySource, rules: list[SyscallRule]) -> None:
    for position, later in enumerate(rules):
        for earlier in rules[:position]:
            if earlier.syscall != later.syscall or earlier.action == later.action:
                continue
            if not rules_disjoint(earlier.args, later.args):
                line = int(later.source.rsplit(":", 1)[1]) if later.source.startswith(f"{source.path}:") else None
                raise source.error(
                    line,
                    f"rules for {later.syscall!r} can match the same call with different actions "
                    f"({earlier.describe()} [{earlier.source}] vs {later.describe()}); make their argument conditions disjoint",
                )
