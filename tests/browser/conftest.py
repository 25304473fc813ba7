"""A served tiny model for the browser test (helpers shared with the integration tests)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import ServerProcess, build_tiny_bundles, bundle_env


@pytest.fixture(scope="module")
def page_server(tiny_backbone, tmp_path_factory):
    bundles = build_tiny_bundles(tmp_path_factory.mktemp("bundles"), tiny_backbone)
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess({**bundle_env(bundles), "SUPPORTLENS_IG_STEPS": "8"}, log).wait_ready()
    yield process
    process.stop()
