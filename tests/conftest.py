"""Shared fixtures: one MLflow server per session (outages through a proxy), few threads."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """THE tracking server of the session (its start costs tens of seconds on 2 cores);
    tests simulate outages with a TcpProxy in front of it, never by stopping it."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tracking_proxy(mlflow_server):
    """A proxy to the session's server that the test can switch off (down) and on (up)."""
    from tcp_proxy import TcpProxy

    proxy = TcpProxy(mlflow_server.port)
    proxy.up()
    yield proxy
    proxy.down()


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores: oversubscribing them with intra-op threads makes tiny models slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)
