"""Shared fixtures: the real Banzai bodies from facebook.com and a loaded pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyveil.pipeline import Pipeline

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CONFIG = REPO / "config"


def banzai_fixture() -> list[tuple[str, bytes]]:
    data = json.loads((TESTS / "fixtures" / "facebook-banzai-2025-01.json").read_text())
    return [(b["content_type"], b["body"].encode("utf-8")) for b in data["bodies"]]


@pytest.fixture(scope="session")
def fixture_bodies() -> list[tuple[str, bytes]]:
    return banzai_fixture()


@pytest.fixture(scope="session")
def pipeline() -> Pipeline:
    return Pipeline.from_config_dir(CONFIG)
