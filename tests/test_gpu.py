"""The CUDA-only paths (skipped without a GPU; their CPU twins run everywhere): the colour
stage, the step without host syncs, LARS's multi-tensor update, the prefetcher's side stream,
kNN with half-precision features, feature extraction under bf16. Imports only torch,
torchvision and caco, so ``launch/gpu_check.sh`` runs it on a bare GPU machine."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g),
                                             size=size, mode="bilinear")
    return (smooth * 255).to(torch.uint8)


def _tiny(bank_size: int = 256):
    from caco.model import CaCo

    torch.manual_seed(0)
    return CaCo("resnet18", dim=32, mlp_dim=64, bank_size=bank_size, small_stem=True,
                width=16, blocks=[1, 1, 1, 1]).cuda()


def test_the_colour_stage_on_the_gpu_matches_the_cpu():
    from caco.augment import caco_two_views
    from caco.device_augment import DeviceAugment

    aug = DeviceAugment(caco_two_views(size=32))
    batch = [_images(64, seed=1), _images(64, seed=2)]
    cpu = aug(batch, seed=11)
    gpu = aug([b.cuda() for b in batch], seed=11)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)


def test_the_compiled_colour_stage_on_the_gpu_matches_eager_and_syncs_nothing():
    from caco.augment import caco_two_views
    from caco.device_augment import DeviceAugment
    from caco.host_sync import HostSyncCounter

    eager, compiled = DeviceAugment(caco_two_views(size=64)), DeviceAugment(caco_two_views(64))
    compiled.compile()
    batch = [_images(64, seed=1).cuda(), _images(64, seed=2).cuda()]
    compiled(batch, seed=0)  # compiles
    with HostSyncCounter() as counter:
        got = compiled(batch, seed=11)
    assert counter.total == 0, counter.counts
    for a, b in zip(eager(batch, seed=11), got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_a_cuda_step_and_colour_stage_make_no_host_sync():
    from caco.augment import caco_two_views
    from caco.device_augment import DeviceAugment
    from caco.host_sync import HostSyncCounter
    from caco.optim import LARS
    from caco.step import caco_step

    model = _tiny()
    opt = LARS(model.encoder_q.parameters(), lr=0.1, weight_decay=1e-5)
    aug = DeviceAugment(caco_two_views(size=32))
    raw = [_images(32, seed=1).cuda(), _images(32, seed=2).cuda()]
    for bf16 in (None, torch.bfloat16):
        with HostSyncCounter() as c:
            for s in range(3):
                out = caco_step(model, opt, aug(raw, seed=s), memory_lr=3.0, ema_momentum=0.99,
                                autocast_dtype=bf16)
        assert c.total == 0, c.counts
        assert out.loss.is_cuda and torch.isfinite(out.loss)


def test_lars_foreach_equals_the_loop_on_cuda():
    from torchvision.models import resnet18

    from caco.optim import LARS

    torch.manual_seed(0)
    nets = [resnet18(num_classes=10).cuda() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [LARS(n.parameters(), lr=0.3, weight_decay=1e-4, foreach=f)
            for n, f in zip(nets, (True, False))]
    x = torch.randn(8, 3, 32, 32, device="cuda")
    for _ in range(3):
        grads = None
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            if grads is None:  # the same gradients for both (backward may reorder sums)
                grads = [p.grad.clone() for p in net.parameters()]
            else:
                for p, g in zip(net.parameters(), grads):
                    p.grad.copy_(g)
            opt.step()
        nets[1].load_state_dict(nets[1].state_dict())
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_the_side_stream_prefetcher_hands_out_finished_batches():
    from caco.augment import caco_two_views
    from caco.device_augment import DeviceAugment
    from caco.prefetch import SideStream, prefetch

    aug = DeviceAugment(caco_two_views(size=64))
    host = [([_images(128, 64, seed=i).pin_memory(), _images(128, 64, seed=i + 99).pin_memory()],
             None) for i in range(6)]

    def prepare(views, step):
        return aug([v.to("cuda", non_blocking=True) for v in views], seed=step)

    inline = [prepare(v, i) for i, (v, _) in enumerate(host)]
    for (i, views), want in zip(prefetch(host, prepare, 0, SideStream(torch.device("cuda"))),
                                inline):
        # heavy work on the default stream: a batch read before its stream finished differs
        torch.randn(2048, 2048, device="cuda").matmul(torch.randn(2048, 2048, device="cuda"))
        for got, ref in zip(views, want):
            assert torch.equal(got, ref), i


def test_knn_with_fp16_features_on_cuda_agrees_with_fp32():
    from caco.knn import knn_classify

    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 64, generator=g)
    y = torch.randint(0, 10, (6000,), generator=g)
    x = means[y] + 0.8 * torch.randn(6000, 64, generator=g)
    full = knn_classify(x[:5000], y[:5000], x[5000:], y[5000:], device="cuda")
    half = knn_classify(x[:5000], y[:5000], x[5000:], y[5000:], device="cuda",
                        feature_dtype="fp16")
    assert abs(full["top1"] - half["top1"]) <= 0.5 and full["top1"] > 50


def test_feature_extraction_on_cuda_runs_bf16_channels_last_by_default():
    from caco.knn import extract_features
    from caco.model import Backbone

    backbone = Backbone(_tiny().encoder_q)
    loader = [(_images(32, seed=i).float() / 255, torch.zeros(32)) for i in range(3)]
    auto, _ = extract_features(backbone, loader, device="cuda")
    exact, _ = extract_features(backbone, loader, device="cuda", channels_last=False,
                                autocast_dtype=None)
    assert auto.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(auto, exact, dim=1)
    assert cos.min() > 0.99 and not torch.equal(auto, exact)


def test_the_linear_probes_frozen_backbone_runs_bf16_on_cuda():
    from caco.model import Backbone
    from evals.linear import frozen_features

    backbone = Backbone(_tiny().encoder_q).eval()
    images = _images(16).float() / 255
    feats = frozen_features(backbone, images, torch.device("cuda"))
    with torch.no_grad():
        exact = backbone(images.cuda())
    assert feats.dtype == torch.float32 and not torch.equal(feats, exact)
    assert torch.nn.functional.cosine_similarity(feats, exact, dim=1).min() > 0.99
