"""The asymmetric two-view and multi-crop augmentations on real Fashion-MNIST images."""

from __future__ import annotations

import pytest
import torch

from caco.augment import MultiViewAugment, caco_multi_crop, caco_two_views
from caco.data.fashion_mnist import FashionMNIST


@pytest.fixture(scope="module")
def images():
    data = FashionMNIST("train", indices=range(64))
    return [data[i][0] for i in range(len(data))]


def test_two_views_are_asymmetric_as_in_the_reference():
    v1, v2 = caco_two_views(size=224)
    assert (v1.blur_p, v1.solarize_p) == (1.0, 0.0)
    assert (v2.blur_p, v2.solarize_p) == (0.1, 0.2)
    for v in (v1, v2):
        assert v.scale == (0.2, 1.0) and v.jitter == (0.4, 0.4, 0.2, 0.1)
        assert (v.jitter_p, v.gray_p) == (0.8, 0.2)
    aug = MultiViewAugment([v1, v2])
    names = [[type(t).__name__ for t in tr.transforms] for tr in aug.transforms]
    assert "RandomSolarize" not in names[0] and "RandomSolarize" in names[1]


def test_two_view_output_shapes_differ_and_are_reproducible(images):
    aug = MultiViewAugment(caco_two_views(size=32))
    torch.manual_seed(0)
    a = [aug(img) for img in images[:8]]
    torch.manual_seed(0)
    b = [aug(img) for img in images[:8]]
    for (x1, x2), (y1, y2) in zip(a, b):
        assert x1.shape == x2.shape == (3, 32, 32) and x1.dtype == torch.float32
        assert not torch.equal(x1, x2)
        assert torch.equal(x1, y1) and torch.equal(x2, y2)


def test_multi_crop_sizes_and_settings(images):
    views = caco_multi_crop(global_size=32, local_size=16, n_local=4)
    assert len(views) == 6 and views[0] == views[1]
    assert views[0].scale == (0.14, 1.0) and views[2].scale == (0.05, 0.14)
    assert all(v.blur_p == 0.5 and v.solarize_p == 0 and v.jitter[2] == 0.4 for v in views)
    out = MultiViewAugment(views)(images[0])
    assert [tuple(t.shape) for t in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4


def test_grayscale_probability_is_applied():
    from dataclasses import replace

    from PIL import Image

    v = caco_two_views(size=16)[0]
    aug = MultiViewAugment([replace(v, gray_p=1.0), replace(v, gray_p=0.0, jitter_p=0.0)])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.manual_seed(0)
    colour = Image.fromarray((torch.rand(24, 24, 3) * 255).to(torch.uint8).numpy(), "RGB")
    for _ in range(8):
        grey, kept = (t * std + mean for t in aug(colour))
        assert torch.allclose(grey[0], grey[1], atol=1e-5)
        assert torch.allclose(grey[1], grey[2], atol=1e-5)
        assert not torch.allclose(kept[0], kept[1], atol=1e-2)


def test_needs_two_views():
    with pytest.raises(ValueError, match="at least two views"):
        MultiViewAugment(caco_two_views()[:1])
