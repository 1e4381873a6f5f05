"""Weighted kNN: chunked computation equals the brute-force definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_caco
from torch.utils.data import DataLoader

from caco.data.fashion_mnist import FashionMNIST
from caco.model import Backbone
from evals.knn import extract_features, knn_classify


def _brute_force(train, train_y, test, test_y, k, t, c):
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).t()
    s, i = sim.topk(k, dim=1)
    votes = torch.zeros(len(test), c).scatter_add_(1, train_y[i], (s / t).exp())
    pred = votes.topk(5, dim=1).indices
    return (100 * (pred[:, 0] == test_y).float().mean().item(),
            100 * (pred == test_y[:, None]).any(1).float().mean().item())


@pytest.mark.parametrize(("k", "train_chunk", "test_chunk"), [(20, 37, 16), (200, 1000, 1000),
                                                              (5, 7, 3)])
def test_chunked_knn_equals_brute_force(k, train_chunk, test_chunk):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=g)
    train_y = torch.randint(10, (600,), generator=g)
    test_y = torch.randint(10, (150,), generator=g)
    train = centers[train_y] + 1.5 * torch.randn(600, 32, generator=g)
    test = centers[test_y] + 1.5 * torch.randn(150, 32, generator=g)
    got = knn_classify(train, train_y, test, test_y, k=k, temperature=0.07,
                       train_chunk=train_chunk, test_chunk=test_chunk)
    top1, top5 = _brute_force(train, train_y, test, test_y, k, 0.07, 10)
    assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)
    assert 30 < got["top1"] <= 100


def test_knn_errors():
    x, y = torch.randn(4, 3), torch.arange(4)
    with pytest.raises(ValueError, match="non-empty"):
        knn_classify(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="k >= 1"):
        knn_classify(x, y, x, y, k=0)


def test_feature_extraction_on_real_images_is_eval_mode_and_restores_mode():
    from torchvision import transforms as T

    data = FashionMNIST("test", transform=T.Compose([T.Resize(32), T.ToTensor()]),
                        indices=range(40))
    model = tiny_caco()
    backbone = Backbone(model.encoder_q)
    backbone.train()
    running = model.encoder_q.bn1.running_mean.clone()
    feats, labels = extract_features(backbone, DataLoader(data, batch_size=16))
    assert feats.shape == (40, model.feature_dim) and labels.tolist() == data.labels.tolist()
    assert torch.equal(running, model.encoder_q.bn1.running_mean)  # eval mode: stats untouched
    assert backbone.training
    again, _ = extract_features(backbone, DataLoader(data, batch_size=7))
    torch.testing.assert_close(feats, again, rtol=1e-4, atol=1e-5)
