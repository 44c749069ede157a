"""Doctests of the package run in a temporary directory: runnable examples that train write
lightning_logs/ and privacy reports into the working directory, never into the checkout."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _doctests_in_tmp_path(request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    if type(request.node).__name__ == "DoctestItem":
        monkeypatch.chdir(tmp_path)
