"""The device-side colour stage shared by both loaders: ops, probabilities, independence."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchvision.transforms import functional as TF

from caco import device_augment as D
from caco.augment import ViewAug, caco_two_views
from caco.data.fashion_mnist import FashionMNIST

OFF = ViewAug(size=16, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
N = 4000


@pytest.fixture(scope="module")
def real_views():
    """N real Fashion-MNIST items as tinted uint8 RGB 16 px images (colour matters here)."""
    data = FashionMNIST("train", indices=range(N))
    grey = torch.as_tensor(data.images[:, 6:22, 6:22]).float() / 255  # the item's centre
    tint = torch.rand(N, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 0.7 + 0.3
    rgb = grey.unsqueeze(1) * tint + (1 - grey.unsqueeze(1)) * 0.25 * tint.flip(1)
    return (rgb * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def textured(real_views):
    """The same images with a fine checkerboard added: no image is flat, so blur shows."""
    checker = (torch.arange(16).view(1, -1) + torch.arange(16).view(-1, 1)) % 2 * 24 - 12
    return (real_views.short() + checker).clamp(0, 255).to(torch.uint8)


def test_each_op_matches_torchvision_per_image():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 20, 24, generator=g)
    f = torch.rand(6, generator=g) * 1.2 + 0.3
    for ours, theirs in ((D.adjust_brightness, TF.adjust_brightness),
                         (D.adjust_contrast, TF.adjust_contrast),
                         (D.adjust_saturation, TF.adjust_saturation)):
        ref = torch.stack([theirs(x[i], float(f[i])) for i in range(6)])
        torch.testing.assert_close(ours(x.clone(), f), ref, atol=1e-5, rtol=0)
    shift = torch.rand(6, generator=g) * 0.2 - 0.1
    ref = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(6)])
    torch.testing.assert_close(D.adjust_hue(x.clone(), shift), ref, atol=1e-5, rtol=0)
    sigma = torch.rand(6, generator=g) * 1.9 + 0.1
    ref = torch.stack([TF.gaussian_blur(x[i], [13, 13], [float(sigma[i])] * 2)
                       for i in range(6)])
    torch.testing.assert_close(D.gaussian_blur(x.clone(), sigma, 6), ref, atol=1e-5, rtol=0)
    ref = torch.stack([TF.rgb_to_grayscale(x[i]) for i in range(6)])
    torch.testing.assert_close(D.gray(x), ref, atol=1e-6, rtol=0)


def _one_sample_at_a_time(aug: D.ViewColorAugment, x: torch.Tensor, params: dict
                          ) -> torch.Tensor:
    """What the stage means: each sample alone, the selected ops in the sample's order."""
    a, out = aug.aug, []
    for i in range(len(x)):
        xi, p = x[i:i + 1], {k: v[i:i + 1] for k, v in params.items()}
        if a.jitter_p > 0 and p["jitter"]:
            for op_index in p["order"][0].tolist():
                xi = D._JITTER_OPS[op_index](xi, p["factors"][:, op_index])
        if a.gray_p > 0 and p["gray"]:
            xi = D.gray(xi).expand(-1, 3, -1, -1)
        if a.blur_p > 0 and p["blur"]:
            xi = D.gaussian_blur(xi, p["sigma"], aug.blur_radius)
        if a.solarize_p > 0 and p["solarize"]:
            xi = torch.where(xi >= a.solarize_threshold / 255.0, 1.0 - xi, xi)
        out.append(xi)
    return torch.cat(out)


@pytest.mark.parametrize("view", [0, 1])
def test_the_branch_free_batch_equals_each_sample_alone(textured, view):
    """Ops on the whole batch with identities for unselected samples change nothing: each
    sample gets what its own ops give it (brightness etc. at factor 1, a delta blur kernel
    and ``where`` are exact)."""
    aug = D.ViewColorAugment(caco_two_views(size=16)[view], (0, 0, 0), (1, 1, 1))
    x = textured[:256].float() / 255
    params = aug.sample_params(len(x), torch.Generator().manual_seed(11))
    assert params["jitter"].any() and not params["jitter"].all()
    torch.testing.assert_close(aug.apply(x, params), _one_sample_at_a_time(aug, x, params),
                               atol=1e-6, rtol=0)


def test_all_ops_off_is_exactly_normalisation(real_views):
    aug = D.ViewColorAugment(OFF, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    out = aug(real_views[:64], torch.Generator().manual_seed(0))
    expected = (real_views[:64].float() / 255 - aug.mean) / aug.std
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("field,p,changed", [
    ("jitter_p", 0.8, lambda x, y: (x - y).abs().amax(dim=(1, 2, 3)) > 1e-4),
    ("gray_p", 0.2, lambda x, y: (y[:, 0] == y[:, 1]).all(dim=(1, 2)) & (y[:, 1] == y[:, 2])
     .all(dim=(1, 2))),
    ("blur_p", 0.1, lambda x, y: (x - y).abs().amax(dim=(1, 2, 3)) > 1e-4),
    ("solarize_p", 0.2, lambda x, y: (x - y).abs().amax(dim=(1, 2, 3)) > 1e-4),
    ("blur_p", 0.5, lambda x, y: (x - y).abs().amax(dim=(1, 2, 3)) > 1e-4),
])
def test_each_op_applies_with_its_probability(textured, field, p, changed):
    # sigma >= 1 here: a blur with sigma ~0.1 leaves pixels unchanged and would not be seen.
    aug = D.ViewColorAugment(replace(OFF, blur_sigma=(1.0, 2.0), **{field: p}),
                             mean=(0, 0, 0), std=(1, 1, 1))
    x = textured.float() / 255
    y = aug(textured, torch.Generator().manual_seed(7))
    rate = changed(x, y).float().mean().item()
    # Binomial standard error at N=4000 is <= 0.008; 0.03 is ~4 standard errors.
    assert abs(rate - p) < 0.03, (field, rate, p)


def test_parameters_differ_across_samples_and_views(real_views):
    one = real_views[:1].expand(32, -1, -1, -1).contiguous()  # the same image 32 times
    full = ViewAug(size=16, jitter_p=1.0, gray_p=0.0, blur_p=1.0, solarize_p=0.0)
    aug = D.DeviceAugment([full, full])
    v1, v2 = aug([one, one.clone()], seed=3)
    flat = v1.flatten(1)
    gap = (flat[:, None] - flat[None]).abs().amax(dim=2)
    assert (gap + torch.eye(32)).gt(1e-3).all()  # every pair of samples differs
    assert ((v1 - v2).abs().amax(dim=(1, 2, 3)) > 1e-3).all()  # and the two views differ


def test_reference_asymmetry_survives_on_the_device(real_views):
    """View 2 of the CaCo recipe solarizes (p 0.2); view 1 never does."""
    v1, v2 = caco_two_views(size=16)
    bright = torch.full((N, 3, 16, 16), 250, dtype=torch.uint8)  # solarize flips it to ~0
    only = [replace(v, jitter_p=0.0, gray_p=0.0, blur_p=0.0) for v in (v1, v2)]
    out1, out2 = D.DeviceAugment(only, (0, 0, 0), (1, 1, 1))([bright, bright.clone()], seed=0)
    assert (out1 > 0.9).all()
    assert abs((out2.amax(dim=(1, 2, 3)) < 0.1).float().mean().item() - 0.2) < 0.03


def test_same_seed_same_batch_and_input_untouched(real_views):
    aug = D.DeviceAugment(caco_two_views(size=16))
    batch = [real_views[:16].clone(), real_views[16:32].clone()]
    before = [b.clone() for b in batch]
    a = aug(batch, seed=D.batch_seed(0, 3, 5, 1))
    b = aug(batch, seed=D.batch_seed(0, 3, 5, 1))
    c = aug(batch, seed=D.batch_seed(0, 3, 6, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert all(torch.equal(x, y) for x, y in zip(batch, before))
    seeds = {D.batch_seed(s, e, t, r) for s in (0, 1) for e in (-1, 0, 1) for t in range(4)
             for r in range(2)}
    assert len(seeds) == 2 * 3 * 4 * 2


def test_bad_inputs_are_named():
    aug = D.DeviceAugment(caco_two_views(size=8))
    with pytest.raises(ValueError, match=r"expected uint8 \(B, 3, H, W\) views, got torch.float32"):
        aug([torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)], seed=0)
    with pytest.raises(ValueError, match="got 1 views, the augmentation defines 2"):
        aug([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], seed=0)


@pytest.mark.slow
def test_the_colour_stage_compiles_as_one_graph_and_gives_the_same_views(textured):
    """``compile=true``: no graph break (fullgraph), views alike share one compiled stage,
    and the compiled views equal the eager ones."""
    import torch._dynamo

    views = caco_two_views(size=16)
    eager, compiled = D.DeviceAugment(views), D.DeviceAugment([*views, views[1]])
    assert compiled.views[1] is compiled.views[2]
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled.compile()
    batch = [textured[:64], textured[64:128], textured[64:128]]
    for seed in (0, 1):
        got, want = compiled(batch, seed), eager(batch[:2], seed)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 2  # one per distinct view, none recompiled
    assert not counters["graph_break"]
    with pytest.raises(ValueError, match="expected uint8"):
        compiled.views[0](textured[:4].float(), torch.Generator())
