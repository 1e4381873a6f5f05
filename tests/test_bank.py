"""The bank update: closed form vs autograd of S(W), and its cooperative/adversarial signs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny import bank_surrogate

from caco.bank import MemoryBank, positive_labels, view_bank_gradient

MEM_T = 0.08


def _closed_form(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    norms = w.norm(dim=0, keepdim=True)
    w_hat = w / norms
    return view_bank_gradient(x, x @ w_hat, y, w_hat, norms, MEM_T)


def _problem(n=6, d=8, k=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Columns of very different norms: the normalisation Jacobian must matter.
    w = torch.randn(d, k, generator=g, dtype=torch.float64) * torch.rand(1, k, generator=g,
                                                                          dtype=torch.float64) * 5
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(k, (n,), generator=g)
    return w, x, y


def test_closed_form_equals_autograd_of_surrogate():
    for seed in range(3):
        w, x, y = _problem(seed=seed)
        wr = w.clone().requires_grad_()
        bank_surrogate(wr, x, y, MEM_T).backward()
        torch.testing.assert_close(_closed_form(w, x, y), wr.grad, rtol=1e-9, atol=1e-12)


def test_positive_column_descends_and_negatives_ascend():
    w, x, y = _problem(n=1, k=30)
    ce = lambda w_: F.cross_entropy(x @ (w_ / w_.norm(dim=0, keepdim=True)) / MEM_T, y)  # noqa: E731
    g = _closed_form(w, x, y)
    pos = torch.zeros_like(w, dtype=torch.bool)
    pos[:, y] = True
    eps = 1e-3
    base = ce(w)
    # Applying only the positive column's update lowers the contrastive loss (cooperative)...
    assert ce(w - eps * torch.where(pos, g, 0)) < base
    # ...applying only the negatives' update raises it (adversarial).
    assert ce(w - eps * torch.where(pos, 0, g)) > base
    # With one query the update is exactly -/+ the CE gradient on positive / negative columns.
    wr = w.clone().requires_grad_()
    ce(wr).backward()
    torch.testing.assert_close(g[:, y], wr.grad[:, y])
    torch.testing.assert_close(g[:, ~pos[0]], -wr.grad[:, ~pos[0]])


def test_update_moves_every_column_towards_the_query():
    w, x, y = _problem(n=1, k=20)
    w_hat = w / w.norm(dim=0, keepdim=True)
    before = x @ w_hat
    new_w = w - 0.01 * _closed_form(w, x, y)
    after = x @ (new_w / new_w.norm(dim=0, keepdim=True))
    assert torch.all(after >= before - 1e-12)
    assert after[0, y] - before[0, y] > 0


def test_apply_gradient_is_momentum_sgd_without_decay_or_renorm():
    torch.manual_seed(0)
    bank = MemoryBank(4, 10)
    w0 = bank.W.clone()
    g1, g2 = torch.randn(4, 10), torch.randn(4, 10)
    bank.apply_gradient(g1, memory_lr=3.0, momentum=0.9)
    bank.apply_gradient(g2, memory_lr=2.0, momentum=0.9)
    v = 0.9 * g1 + g2
    torch.testing.assert_close(bank.V, v)
    torch.testing.assert_close(bank.W, w0 - 3.0 * g1 - 2.0 * v)


def test_positive_labels_are_argmax_of_cosine_to_normalised_columns():
    w = torch.tensor([[10.0, 0.0, 0.6], [0.0, 1.0, 0.8]])
    w_hat = w / w.norm(dim=0, keepdim=True)
    keys = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.01]]), dim=1)
    # Column 0 has the largest raw dot product with key 0 but not the largest cosine.
    assert positive_labels(keys, w_hat).tolist() == [2, 1, 0]
