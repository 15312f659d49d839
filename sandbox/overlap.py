"""Can two rules for the same syscall match the same call?

libseccomp does not evaluate rules in file order: it builds one decision tree per syscall, testing lower
argument indexes first. When two rules with different actions can both match, which one wins is an
accident of that tree. The loader therefore rejects such pairs unless this module can prove them
disjoint; it errs on the side of "may overlap".
"""
from __future__ import annotations

from .constants import U64_MASK
from .policy import ArgCondition, ComparisonOp, RuntimeConstant

_RANGE_OPS = {ComparisonOp.LT, ComparisonOp.LE, ComparisonOp.GT, ComparisonOp.GE}


def rules_disjoint(first: tuple[ArgCondition, ...], second: tuple[ArgCondition, ...]) -> bool:
    """True when no argument vector satisfies both condition lists (provably; False means "may overlap")."""
    by_index = {c.index: c for c in second}
    return any(c.index in by_index and conditions_disjoint(c, by_index[c.index]) for c in first)


def conditions_disjoint(a: ArgCondition, b: ArgCondition) -> bool:
    """True when no single 64-bit value satisfies both conditions on the same argument."""
    symbolic = _symbolic_disjoint(a, b)
    if symbolic is not None:
        return symbolic
    if a.op is ComparisonOp.EQ:
        return not holds(b, _int(a.value))
    if b.op is ComparisonOp.EQ:
        return not holds(a, _int(b.value))
    if a.op is ComparisonOp.MASKED_EQ and b.op is ComparisonOp.MASKED_EQ:
        common = _int(a.mask) & _int(b.mask)
        return bool((_int(a.value) ^ _int(b.value)) & common)
    if a.op in _RANGE_OPS and b.op in _RANGE_OPS:
        (low_a, high_a), (low_b, high_b) = _interval(a), _interval(b)
        return high_a < low_b or high_b < low_a or low_a > high_a or low_b > high_b
    if a.op is ComparisonOp.NE and b.op in _RANGE_OPS:
        return _interval(b) == (_int(a.value), _int(a.value))
    if b.op is ComparisonOp.NE and a.op in _RANGE_OPS:
        return _interval(a) == (_int(b.value), _int(b.value))
    return False


def holds(condition: ArgCondition, value: int) -> bool:
    """Evaluate a condition with integer operands on one argument value."""
    operand = _int(condition.value)
    match condition.op:
        case ComparisonOp.EQ:
            return value == operand
        case ComparisonOp.NE:
            return value != operand
        case ComparisonOp.LT:
            return value < operand
        case ComparisonOp.LE:
            return value <= operand
        case ComparisonOp.GT:
            return value > operand
        case ComparisonOp.GE:
            return value >= operand
        case ComparisonOp.MASKED_EQ:
            return value & _int(condition.mask) == operand
    raise AssertionError(condition.op)


def _symbolic_disjoint(a: ArgCondition, b: ArgCondition) -> bool | None:
    """Decide pairs involving runtime constants: only `eq X` against `ne X` is provably disjoint."""
    operands = (a.value, b.value, a.mask, b.mask)
    if not any(isinstance(o, RuntimeConstant) for o in operands):
        return None
    if a.value == b.value and {a.op, b.op} == {ComparisonOp.EQ, ComparisonOp.NE}:
        return True
    return False


def _interval(condition: ArgCondition) -> tuple[int, int]:
    """The closed range a range comparison accepts; (1, 0) when it accepts nothing."""
    operand = _int(condition.value)
    match condition.op:
        case ComparisonOp.LT:
            return (0, operand - 1) if operand > 0 else (1, 0)
        case ComparisonOp.LE:
            return 0, operand
        case ComparisonOp.GT:
            return (operand + 1, U64_MASK) if operand < U64_MASK else (1, 0)
        case ComparisonOp.GE:
            return operand, U64_MASK
    raise AssertionError(condition.op)


def _int(operand: object) -> int:
    assert isinstance(operand, int), operand
    return operand
