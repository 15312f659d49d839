"""The layer check itself (tests/layers.py), on small made-up suites run by pytest in process."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit

INI = """
[pytest]
addopts = --strict-markers -p no:cacheprovider
markers =
    unit: u
    live: l
    attack: a
"""
CONFTEST = "from layers import pytest_collection_modifyitems  # noqa: F401\n"


def test_an_unmarked_or_doubly_marked_test_fails_collection_naming_it(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mixed="""
        import pytest

        @pytest.mark.unit
        def test_marked(): pass

        def test_forgotten(): pass

        @pytest.mark.unit
        @pytest.mark.live
        def test_both(): pass
    """)
    result = pytester.runpytest_inprocess("-m", "unit")  # even a run of one layer checks every test
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*exactly one layer marker*", "*test_mixed.py::test_forgotten: no layer*", "*test_mixed.py::test_both: live, unit*"])


def test_layers_select_and_tests_under_attack_are_attack(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_module="""
        import pytest

        pytestmark = pytest.mark.live

        def test_one(): pass
        def test_two(): pass
    """)
    pytester.mkdir("attack")
    pytester.makepyfile(**{"attack/test_probe": "def test_from_outside(): pass\n"})
    assert pytester.runpytest_inprocess("-m", "live").parseoutcomes() == {"passed": 2, "deselected": 1}
    assert pytester.runpytest_inprocess("-m", "attack").parseoutcomes() == {"passed": 1, "deselected": 2}
    assert pytester.runpytest_inprocess("-m", "unit").ret == pytest.ExitCode.NO_TESTS_COLLECTED
