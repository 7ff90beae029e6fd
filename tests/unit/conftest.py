"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def cfgdir(tmp_path):
    """A directory with a valid key file (mode 0600)."""
    key = tmp_path / "key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    return tmp_path
