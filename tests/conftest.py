"""Shared pytest fixtures.

Object storage: a real S3-protocol server (moto) on 127.0.0.1, started once
per session; see ``tests/s3_server.py`` for the helpers behind these fixtures.
"""

from __future__ import annotations

import pytest

from tests.s3_server import FaultProxy, S3Server


def pytest_collection_modifyitems(config, items):
    """`stress` tests (minutes each: repeated launches, the whole demo, the full gpu-check smoke) run only when the -m expression names them (`-m stress`,
    which .ci/run runs after the main suite), so `python3 run.py test` stays within 15 minutes."""
    if "stress" in (config.getoption("markexpr") or ""):
        return
    dropped = [item for item in items if item.get_closest_marker("stress")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("stress")]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback for the whole session (``S3Server``)."""
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, with this test's environment pointed at it.

    Sets ``S3_ENDPOINT_URL`` and dummy ``AWS_*`` credentials, which s3fs,
    boto3 and MosaicML Streaming all read (spawned workers inherit them).
    """
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3) -> str:
    """A fresh, empty bucket on the loopback server; its name."""
    return s3.make_bucket()


@pytest.fixture
def s3_fault_proxy(s3):
    """A ``FaultProxy`` in front of the S3 server (not yet in the environment:
    point ``S3_ENDPOINT_URL`` at ``proxy.endpoint_url`` where faults are wanted)."""
    proxy = FaultProxy(s3.port).start()
    yield proxy
    proxy.stop()
