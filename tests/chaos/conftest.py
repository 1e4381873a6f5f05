"""The chaos suite (marker ``chaos``, run by CI): faults injected at named points by
``inject/sitecustomize.py`` (never by the library), then the invariants: final weights equal an
undisturbed run, every milestone's DAG ends COMPLETED or reported FAILED, no idempotency key
twice in sacct, every metric in MLflow exactly once."""

from __future__ import annotations

import pytest
from chaos_utils import run_pretrain


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/chaos/" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def undisturbed(tmp_path_factory):
    """The reference: the chaos runs' recipe, trained without any fault."""
    root = tmp_path_factory.mktemp("undisturbed")
    proc = run_pretrain(root, "ref", "dag=none", "tracking.enabled=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "runs" / "ref" / "checkpoints" / "last.pt"
