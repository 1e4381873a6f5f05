"""Model structure: torchvision ResNet + bias-free projector, EMA encoder, bank buffers."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_caco
from torch import nn
from torchvision.models import resnet18, resnet50

from caco.model import CaCo, build_backbone


def test_resnet50_layout_matches_torchvision_and_reference_projector():
    m = CaCo("resnet50", dim=256, mlp_dim=2048, bank_size=128)
    tv_keys = {k for k in resnet50().state_dict() if not k.startswith("fc.")}
    q_keys = set(m.encoder_q.state_dict())
    assert tv_keys <= q_keys
    assert q_keys - tv_keys == {
        "fc.0.weight", "fc.1.weight", "fc.1.bias", "fc.1.running_mean", "fc.1.running_var",
        "fc.1.num_batches_tracked", "fc.3.weight", "fc.4.weight", "fc.4.bias",
        "fc.4.running_mean", "fc.4.running_var", "fc.4.num_batches_tracked", "fc.6.weight"}
    linears = [mod for mod in m.encoder_q.modules() if isinstance(mod, nn.Linear)]
    assert [(lin.in_features, lin.out_features, lin.bias) for lin in linears] == [
        (2048, 2048, None), (2048, 2048, None), (2048, 256, None)]
    assert m.bank.W.shape == (256, 128) and m.bank.V.shape == (256, 128)
    assert isinstance(m.encoder_q.conv1, nn.Conv2d) and m.encoder_q.conv1.kernel_size == (7, 7)


def test_key_encoder_starts_as_exact_copy_and_is_not_trained():
    m = tiny_caco()
    for (nq, pq), (nk, pk) in zip(m.encoder_q.named_parameters(), m.encoder_k.named_parameters()):
        assert nq == nk and torch.equal(pq, pk) and pq.data_ptr() != pk.data_ptr()
        assert not pk.requires_grad
    q_params = {id(p) for p in m.encoder_q.parameters()}
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == q_params


def test_ema_update_touches_parameters_only():
    m = tiny_caco()
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        for _name, b in m.encoder_q.named_buffers():
            if b.is_floating_point():
                b.add_(1.0)
    k_before = {n: p.clone() for n, p in m.encoder_k.named_parameters()}
    buf_before = {n: b.clone() for n, b in m.encoder_k.named_buffers()}
    q = dict(m.encoder_q.named_parameters())
    m.ema_update(0.9)
    for n, p in m.encoder_k.named_parameters():
        torch.testing.assert_close(p, 0.9 * k_before[n] + 0.1 * q[n].detach())
    for n, b in m.encoder_k.named_buffers():
        assert torch.equal(b, buf_before[n]), n


def test_forward_gives_unit_queries_for_all_views_and_keys_for_two():
    m = tiny_caco()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    queries, keys = m(views, 0.99)
    assert len(queries) == 3 and len(keys) == 2
    for t in queries + keys:
        assert t.shape == (4, 16) and t.dtype == torch.float32
        torch.testing.assert_close(t.norm(dim=1), torch.ones(4))
    assert queries[0].requires_grad and not keys[0].requires_grad


def test_small_stem_and_width_options():
    net, dim = build_backbone("resnet18", small_stem=True, width=16, blocks=(1, 1, 1, 1))
    assert dim == 128 and net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    std, dim = build_backbone("resnet18")
    assert dim == 512
    assert set(std.state_dict()) == {k for k in resnet18().state_dict() if not k.startswith("fc.")}


def test_features_are_backbone_pooled_not_projector():
    m = tiny_caco()
    x = torch.randn(3, 3, 32, 32)
    m.eval()
    assert m.features(x).shape == (3, m.feature_dim)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(arch="vgg16"), "model.arch='vgg16'"),
    (dict(moco_t=0), "moco_t"),
    (dict(blocks=(1, 1)), "model.blocks"),
    (dict(bank_size=0), "bank"),
])
def test_bad_model_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_caco(**kwargs)
