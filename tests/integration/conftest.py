"""Fixtures shared by the authz integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", params=["stock", "fast"])
def authz_engine(request: pytest.FixtureRequest) -> str:
    """The authz serving engine under test (``AuthzService(engine=...)``, ``meshward
    authz --engine``): every test that starts authz runs on both. Module-scoped so a
    module-scoped service is built once per engine."""
    return str(request.param)
