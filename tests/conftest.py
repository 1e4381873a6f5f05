"""Shared fixtures: tiny but real torchvision ResNets so the unit tests run in seconds on CPU."""

from __future__ import annotations

import pytest
import torch

from caco.model import CaCo

TINY = dict(arch="resnet18", dim=16, mlp_dim=32, small_stem=True, width=8, blocks=(1, 1, 1, 1))


def tiny_caco(bank_size: int = 64, seed: int = 0, **overrides) -> CaCo:
    torch.manual_seed(seed)
    return CaCo(**{**TINY, "bank_size": bank_size, **overrides})


def bank_surrogate(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mem_t: float):
    """S(W) of caco.md §4 with the coefficients c_nk held constant (for autograd checks)."""
    w_hat = w / w.norm(dim=0, keepdim=True)
    logits = x @ w_hat
    p = torch.softmax(logits.detach() / mem_t, dim=1)
    c = -p
    rows = torch.arange(len(y))
    c[rows, y] = p[rows, y] - 1
    return (c * logits).sum() / len(y) / mem_t


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
