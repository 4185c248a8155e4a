"""Shared test setup: hypothesis profiles, and no silent skips of real-model tests under CI.

A suite that is green exactly where the product fails is worse than none (issue 9: the two
real-model tests skipped for a missing default text while ``emprune demo`` failed for the same
reason). So when ``CI`` is set to a true value (``1``, ``true``, ``yes``, ``on``):

* a test marked ``real_model`` that skips is reported as a failure, with the skip's reason;
* a test module skipped as a whole (``pytest.importorskip`` at import) is a collection error,
  since it would hide whatever real-model tests it holds. CI installs every extra
  (``scripts/test.sh``), so there such a skip always means a broken environment.

Other skips (say, the optional numba kernel absent on a dev box) stay skips, with their reason.
"""
from __future__ import annotations

import os

import pytest

# keep property-based tests quick and deterministic in CI
from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def ci_enabled() -> bool:
    """Whether this run is CI (``CI`` set to 1/true/yes/on, any case), where skips of real-model tests fail."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_model: loads a real pretrained model; under CI=true a skip of it is a failure")


def _reason(longrepr: object) -> str:
    """The message of a skip report (``(path, line, 'Skipped: why')`` or anything printable)."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    if (rep.skipped and not hasattr(rep, "wasxfail") and ci_enabled()
            and item.get_closest_marker("real_model") is not None):
        rep.outcome = "failed"
        rep.longrepr = (f"real-model test skipped under CI ({_reason(rep.longrepr)}); "
                        "CI must run it: install the llm extras and the model (scripts/test.sh)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and ci_enabled() and isinstance(collector, pytest.Module):
        rep.outcome = "failed"
        rep.longrepr = (f"test module skipped as a whole under CI ({_reason(rep.longrepr)}); "
                        "it may hold real-model tests: install every extra (scripts/test.sh)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, text file) of the 3-block random LLaMA of tests/tiny_llama.py saved to disk
    (max_position_embeddings 256): the LLM command-line tests' model."""
    from tiny_llama import TEXT, save_tiny

    root = tmp_path_factory.mktemp("tiny")
    save_tiny(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root / "model", root / "text.txt"


@pytest.fixture
def no_load(monkeypatch):
    """Make loading the model's weights fail loudly: a CLI check that passes with this fixture
    ran before the load (the command-line tests' fixture)."""
    from emprune.models import loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(loading, "load_causal_lm", boom)
