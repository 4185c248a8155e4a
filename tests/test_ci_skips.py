"""The conftest rule: under CI, a skipped real-model test (or a module skipped as a whole) fails.

Runs a small inner pytest session with a copy of this suite's ``conftest.py``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py").read_text()

TESTS = '''
import pytest

@pytest.mark.real_model
def test_real_model_skips():
    pytest.skip("model not installed here")

@pytest.mark.real_model
def test_real_model_runs():
    assert True

def test_optional_kernel_skips():
    pytest.skip("numba not installed")

@pytest.mark.real_model
@pytest.mark.xfail(reason="known bug", strict=True)
def test_real_model_xfails():
    raise AssertionError
'''


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None) -> pytest.RunResult:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_marks=TESTS, test_whole=(
        "import pytest\npytest.importorskip('emprune_no_such_module')\n\ndef test_never():\n    pass\n"))
    return pytester.runpytest("-p", "no:cacheprovider", "-rs", "--continue-on-collection-errors")


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_under_ci_real_model_skips_fail(pytester, monkeypatch, ci):
    res = _run(pytester, monkeypatch, ci)
    res.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1, errors=1)
    out = res.stdout.str()
    assert "real-model test skipped under CI (Skipped: model not installed here)" in out
    assert "test module skipped as a whole under CI" in out and "emprune_no_such_module" in out
    assert "numba not installed" in out  # other skips keep their reason and stay skips
    assert res.ret != 0


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_outside_ci_skips_stay_skips(pytester, monkeypatch, ci):
    res = _run(pytester, monkeypatch, ci)
    res.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert res.ret == 0
