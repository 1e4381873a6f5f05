"""caco_step and init_bank against a naive re-derivation of caco.md §3, §7 and §8.

The naive version below uses autograd of S(W) for the bank (not the closed form) and spells
the pairs out by hand, so an error in the step's bookkeeping shows up as a mismatch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import bank_surrogate, tiny_caco

from caco.optim import LARS
from caco.step import caco_step, init_bank, loss_pairs

MEMORY_LR, EMA = 3.0, 0.99


def _optimizer(model, lr=0.05):
    return LARS(model.encoder_q.parameters(), lr=lr, weight_decay=1.5e-6, momentum=0.9)


def naive_step(model, opt, views):
    """Straight from the spec, with every pair written out."""
    with torch.no_grad():
        for pk, pq in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
            pk.copy_(EMA * pk + (1 - EMA) * pq)
    qs = [F.normalize(model.encoder_q(v), dim=1) for v in views]
    with torch.no_grad():
        k1, k2 = (F.normalize(model.encoder_k(v), dim=1) for v in views[:2])
    w = model.bank.W.clone()
    w_hat = w / w.norm(dim=0, keepdim=True)
    from_k1, from_k2 = (k1 @ w_hat).argmax(1), (k2 @ w_hat).argmax(1)
    t = model.moco_t
    if len(views) == 2:
        y1, y2 = from_k2, from_k1  # swapped keys: view 2's key labels view 1's queries
        loss = F.cross_entropy(qs[0] @ w_hat / t, y1) + F.cross_entropy(qs[1] @ w_hat / t, y2)
        bank_terms = [(qs[0], y1, 1.0), (qs[1], y2, 1.0)]
        labels = [y1, y2]
    else:
        glob = [(qs[0], from_k2), (qs[1], from_k1)]
        local = [(q, y) for q in qs[2:] for y in (from_k1, from_k2)]
        loss = sum(F.cross_entropy(q @ w_hat / t, y) for q, y in glob) / len(glob)
        loss = loss + sum(F.cross_entropy(q @ w_hat / t, y) for q, y in local) / len(local)
        bank_terms = [(q, y, 1 / len(glob)) for q, y in glob]
        bank_terms += [(q, y, 1 / len(local)) for q, y in local]
        labels = [from_k1, from_k2]
    opt.zero_grad()
    loss.backward()
    opt.step()
    wr = w.clone().requires_grad_()
    s = sum(wt * bank_surrogate(wr, q.detach(), y, model.mem_t) for q, y, wt in bank_terms)
    (g,) = torch.autograd.grad(s, wr)
    with torch.no_grad():
        model.bank.V.mul_(model.mem_momentum).add_(g)
        model.bank.W.sub_(MEMORY_LR * model.bank.V)
    return float(loss.detach()), labels


def _assert_same_state(a, b):
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=n)
        else:
            assert torch.equal(x, y), n


def _twin(model, opt):
    """An independent copy of model and optimizer state (load_state_dict would alias buffers)."""
    ref = copy.deepcopy(model)
    ref_opt = _optimizer(ref)
    for p, q in zip(model.encoder_q.parameters(), ref.encoder_q.parameters()):
        if "mu" in opt.state[p]:
            ref_opt.state[q]["mu"] = opt.state[p]["mu"].clone()
    return ref, ref_opt


@pytest.mark.parametrize("n_local", [0, 3])
def test_step_matches_naive_spec_over_three_steps(n_local):
    # Each step starts the naive twin from the step's own state: with random inputs the
    # dynamics amplify float32 rounding chaotically, so only per-step equality is meaningful.
    model = tiny_caco(bank_size=48)
    opt = _optimizer(model)
    torch.manual_seed(1)
    for _ in range(3):
        views = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)]
        views += [torch.randn(6, 3, 16, 16) for _ in range(n_local)]
        ref, ref_opt = _twin(model, opt)
        out = caco_step(model, opt, views, memory_lr=MEMORY_LR, ema_momentum=EMA)
        ref_loss, ref_labels = naive_step(ref, ref_opt, views)
        assert float(out.loss) == pytest.approx(ref_loss, rel=1e-5)
        assert len(out.labels) == 2
        for got, want in zip(out.labels, ref_labels):
            assert torch.equal(got, want)
        _assert_same_state(model, ref)
        for p, q in zip(model.encoder_q.parameters(), ref.encoder_q.parameters()):
            torch.testing.assert_close(opt.state[p]["mu"], ref_opt.state[q]["mu"],
                                       rtol=1e-4, atol=1e-6)
    assert model.bank.V.abs().sum() > 0


def test_loss_pairs_and_weights():
    assert loss_pairs(2) == [(0, 1, 1.0), (1, 0, 1.0)]
    pairs = loss_pairs(5)
    assert pairs[:2] == [(0, 1, 0.5), (1, 0, 0.5)]
    assert [(i, j) for i, j, _ in pairs[2:]] == [(2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1)]
    assert sum(w for *_, w in pairs[2:]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two views"):
        loss_pairs(1)


def test_step_reports_positive_statistics():
    model = tiny_caco(bank_size=32)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    out = caco_step(model, _optimizer(model), views, memory_lr=MEMORY_LR, ema_momentum=EMA)
    for value in (out.loss, out.positive_prob, out.positive_columns_frac):
        assert isinstance(value, torch.Tensor) and value.dim() == 0  # read only when logged
    assert 0 < float(out.positive_prob) < 1
    distinct = sum(torch.unique(y).numel() for y in out.labels) / 16
    assert float(out.positive_columns_frac) == pytest.approx(distinct)


def test_bf16_autocast_keeps_bank_logits_and_update_in_fp32(monkeypatch):
    import caco.step as step_module

    seen = {"logits": [], "grad_inputs": []}
    real_logits, real_grad = step_module.bank_logits, step_module.view_bank_gradient

    def spy_logits(q, w_hat):
        out = real_logits(q, w_hat)
        seen["logits"].append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    def spy_grad(*args, **kwargs):
        seen["grad_inputs"].append(
            [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()])
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(step_module, "bank_logits", spy_logits)
    monkeypatch.setattr(step_module, "view_bank_gradient", spy_grad)
    model = tiny_caco(bank_size=32)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    encoder_dtypes = []
    model.encoder_q.fc[0].register_forward_hook(lambda _m, _i, o: encoder_dtypes.append(o.dtype))
    out = caco_step(model, _optimizer(model), views, memory_lr=MEMORY_LR, ema_momentum=EMA,
                    autocast_dtype=torch.bfloat16)
    assert encoder_dtypes == [torch.bfloat16, torch.bfloat16]  # the encoders did run in bf16
    assert [dtype for _, dtype in seen["logits"]] == [torch.float32] * 2  # both query views
    assert all(dtypes == [torch.float32] * 4 for dtypes in seen["grad_inputs"])
    assert len(seen["grad_inputs"]) == 2
    assert model.bank.W.dtype == torch.float32 and model.bank.V.dtype == torch.float32
    assert torch.isfinite(model.bank.W).all() and float(out.loss) > 0


def test_init_bank_fills_columns_in_order_with_unit_keys_and_resets():
    model = tiny_caco(bank_size=20)
    opt = _optimizer(model, lr=0.01)
    keys = []
    hook = model.encoder_k.register_forward_hook(
        lambda _m, _i, out: keys.append(F.normalize(out.detach().float(), dim=1)))
    consumed = []

    def batches():
        torch.manual_seed(3)
        for b in range(6):
            consumed.append(b)
            yield [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]

    losses = init_bank(model, opt, batches(), lr=0.7)
    hook.remove()
    assert len(losses) == 3 and consumed == [0, 1, 2]  # 8 + 8 + 4 columns, nothing more read
    assert all(g["lr"] == 0.7 for g in opt.param_groups)
    torch.testing.assert_close(model.bank.W[:, :8], keys[0].t())
    torch.testing.assert_close(model.bank.W[:, 8:16], keys[1].t())
    torch.testing.assert_close(model.bank.W[:, 16:20], keys[2][:4].t())
    torch.testing.assert_close(model.bank.W.norm(dim=0), torch.ones(20))
    assert torch.count_nonzero(model.bank.V) == 0
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk)
    # The encoder was trained, and the optimizer's momentum carries into epoch 0.
    assert all("mu" in opt.state[p] for p in model.encoder_q.parameters())


def test_init_bank_uses_ema_0999_and_first_view_queries_against_second_view_keys():
    model = tiny_caco(bank_size=8)
    ref = copy.deepcopy(model)
    opt = _optimizer(model, lr=0.3)
    torch.manual_seed(5)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    (loss,) = init_bank(model, opt, [views])
    ref.ema_update(0.999)
    q1 = F.normalize(ref.encoder_q(views[0]), dim=1)
    k2 = F.normalize(ref.encoder_k(views[1]), dim=1)
    w_hat = ref.bank.W / ref.bank.W.norm(dim=0, keepdim=True)
    logits = torch.cat([(q1 * k2).sum(1, keepdim=True), q1 @ w_hat], 1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)).detach()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(model.bank.W, k2.detach().t())


def test_init_bank_refuses_too_few_batches():
    model = tiny_caco(bank_size=40)
    with pytest.raises(ValueError, match="filled 16 of 40"):
        init_bank(model, _optimizer(model), [[torch.randn(8, 3, 32, 32)] * 2] * 2)
