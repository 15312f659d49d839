"""The loader's "can these two rules match the same call?" check must never call overlapping rules disjoint."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openinfer.sandbox import ArgCondition, ComparisonOp, RuntimeConstant
from openinfer.sandbox.overlap import conditions_disjoint, holds, rules_disjoint

pytestmark = pytest.mark.unit

U64 = (1 << 64) - 1
interesting = st.sampled_from([0, 1, 2, 4, 0x10000, U64 - 1, U64]) | st.integers(0, 16) | st.integers(0, U64)


@st.composite
def conditions(draw: st.DrawFn) -> ArgCondition:
    op = draw(st.sampled_from(list(ComparisonOp)))
    if op is ComparisonOp.MASKED_EQ:
        mask = draw(interesting)
        return ArgCondition(0, op, draw(interesting) & mask, mask)
    return ArgCondition(0, op, draw(interesting))


@settings(max_examples=400, deadline=None, database=None)
@given(conditions(), conditions(), st.lists(interesting, min_size=1, max_size=20))
def test_disjoint_means_no_value_satisfies_both(a: ArgCondition, b: ArgCondition, values: list[int]) -> None:
    if conditions_disjoint(a, b):
        # besides random values, try the values the conditions themselves name: that is where overlaps hide
        candidates = values + [c for cond in (a, b) for v in (cond.value, cond.mask or 0) for c in (v, v - 1, v + 1)]
        for value in candidates:
            if 0 <= value <= U64:
                assert not (holds(a, value) and holds(b, value)), (a, b, value)


def test_typical_pairs() -> None:
    eq1, ne1 = ArgCondition(0, ComparisonOp.EQ, 1), ArgCondition(0, ComparisonOp.NE, 1)
    no_exec = ArgCondition(2, ComparisonOp.MASKED_EQ, 0, 4)
    exec_ = ArgCondition(2, ComparisonOp.MASKED_EQ, 4, 4)
    assert conditions_disjoint(eq1, ne1)
    assert conditions_disjoint(no_exec, exec_)
    assert conditions_disjoint(ArgCondition(1, ComparisonOp.LE, 4), ArgCondition(1, ComparisonOp.GT, 4))
    assert not conditions_disjoint(ArgCondition(1, ComparisonOp.LE, 4), ArgCondition(1, ComparisonOp.GE, 4))
    pid = RuntimeConstant("SELF_PID")
    assert conditions_disjoint(ArgCondition(0, ComparisonOp.EQ, pid), ArgCondition(0, ComparisonOp.NE, pid))
    assert not conditions_disjoint(ArgCondition(0, ComparisonOp.EQ, pid), ArgCondition(0, ComparisonOp.EQ, 5))
    # conditions on different arguments never make rules disjoint; an unconditional rule overlaps everything
    assert not rules_disjoint((eq1,), (ArgCondition(1, ComparisonOp.EQ, 2),))
    assert not rules_disjoint((), (eq1,))
    assert rules_disjoint((eq1, no_exec), (ne1,))
