"""Shared fixtures: the real data directory and the pretrained model folder.

Locally a missing data directory or model package skips the tests that need
them; under CI=true it is a failure, never a silent skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required, not skipped)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from mtbert.data import DataDirError, resolve_data_dir

    try:
        return resolve_data_dir(None)
    except DataDirError as exc:
        _missing(str(exc))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from mtbert.pretrained import ModelFolderError, resolve_model_dir

    try:
        return resolve_model_dir(None)
    except ModelFolderError as exc:
        _missing(str(exc))
