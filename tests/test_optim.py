"""LARS as the reference runs it: trust ratio and decay only on parameters with ndim > 1."""

from __future__ import annotations

import pytest
import torch

from caco.optim import LARS


def _grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def test_two_dim_parameter_gets_decay_trust_ratio_and_momentum():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = LARS([w], lr=0.5, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)
    mu = torch.zeros_like(w)
    expected = w.detach().clone()
    for _ in range(3):
        g = torch.randn(5, 3)
        u = g + 0.01 * expected
        ratio = 0.001 * expected.norm() / u.norm()
        mu = 0.9 * mu + ratio * u
        expected = expected - 0.5 * mu
        _grads([w], [g])
        opt.step()
    torch.testing.assert_close(w.detach(), expected)


def test_one_dim_parameters_get_plain_momentum_sgd():
    torch.manual_seed(0)
    b = torch.nn.Parameter(torch.randn(7))
    start = b.detach().clone()
    opt = LARS([b], lr=0.1, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    g1, g2 = torch.randn(7), torch.randn(7)
    _grads([b], [g1])
    opt.step()
    _grads([b], [g2])
    opt.step()
    # No decay (0.5 would be visible) and no trust scaling (0.001 would shrink it 1000x).
    torch.testing.assert_close(b.detach(), start - 0.1 * g1 - 0.1 * (0.9 * g1 + g2))


def test_zero_norm_parameter_uses_ratio_one():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0)
    g = torch.ones(3, 3)
    _grads([w], [g])
    opt.step()
    torch.testing.assert_close(w.detach(), -g)


def test_parameters_without_grad_are_untouched():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([a, b], lr=1.0)
    _grads([a], [torch.ones(2, 2)])
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2, 2))
    assert not torch.equal(a.detach(), torch.ones(2, 2))


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="momentum"):
        LARS([torch.nn.Parameter(torch.ones(1))], lr=0.1, momentum=1.5)


def test_the_multi_tensor_update_equals_the_per_tensor_loop_bitwise():
    """A real ResNet-18 (convs, BN, fc), a zero-norm weight and a parameter without grad,
    five steps: foreach and the loop agree bit for bit on CPU."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    nets = [resnet18(num_classes=10), resnet18(num_classes=10)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        torch.nn.init.zeros_(net.fc.weight)
        net.layer4[1].conv2.weight.requires_grad_(False)
    opts = [LARS([p for p in net.parameters() if p.requires_grad], lr=0.3, weight_decay=1e-4,
                 momentum=0.9, foreach=foreach) for net, foreach in zip(nets, (True, False))]
    x = torch.randn(4, 3, 32, 32)
    for _ in range(5):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(nets[0].fc.weight, torch.zeros_like(nets[0].fc.weight))


def test_an_optimizer_state_saved_before_foreach_existed_loads_and_steps():
    w = torch.nn.Parameter(torch.ones(3, 3))
    opt = LARS([w], lr=0.1)
    _grads([w], [torch.ones(3, 3)])
    opt.step()
    state = opt.state_dict()
    del state["param_groups"][0]["foreach"]  # what checkpoints of earlier versions hold
    again = LARS([w], lr=0.1)
    again.load_state_dict(state)
    _grads([w], [torch.ones(3, 3)])
    again.step()
    assert torch.isfinite(w).all() and again.state[w]["mu"].abs().sum() > 0
