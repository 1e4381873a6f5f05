"""CaCo networks: ResNet backbone + bias-free projector, EMA key encoder, learnable bank.

The layout mirrors the reference so that its checkpoints load by name:
``encoder_q`` / ``encoder_k`` are torchvision ResNets whose ``fc`` is the projector
``Linear -> BN1d -> ReLU -> Linear -> BN1d -> ReLU -> Linear`` (``fc.0``, ``fc.1``, ``fc.3``,
``fc.4``, ``fc.6``), all Linear layers without bias and no BN after the last one (caco.md §1).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from caco.bank import MemoryBank

ARCHS = {
    # name: (block kind, blocks per stage)
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def build_backbone(
    arch: str,
    *,
    small_stem: bool = False,
    width: int = 64,
    blocks: Sequence[int] | None = None,
) -> tuple[nn.Module, int]:
    """A torchvision ResNet with its classifier removed (``fc`` is Identity).

    ``small_stem`` replaces the 7x7/2 conv + max-pool with a 3x3/1 conv for 32 px inputs.
    ``width`` (channels of the first stage, 64 in torchvision) and ``blocks`` (blocks per
    stage) shrink the network for CPU demos and tests. Returns ``(resnet, feature_dim)``.
    """
    from torchvision.models import resnet as tv

    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is not supported; choose one of {sorted(ARCHS)}")
    kind, default_blocks = ARCHS[arch]
    blocks = tuple(blocks) if blocks is not None else default_blocks
    if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
        raise ValueError(f"model.blocks must be 4 positive integers, got {list(blocks)}")
    if width < 1:
        raise ValueError(f"model.width must be positive, got {width}")
    block = tv.BasicBlock if kind == "basic" else tv.Bottleneck
    net = tv.ResNet(block, list(blocks))
    if width != 64:
        # torchvision hard-codes 64/128/256/512 channels; rebuild the stages with its own
        # _make_layer so that parameter names stay torchvision's.
        net.inplanes = width
        net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(block, width, blocks[0])
        net.layer2 = net._make_layer(block, width * 2, blocks[1], stride=2)
        net.layer3 = net._make_layer(block, width * 4, blocks[2], stride=2)
        net.layer4 = net._make_layer(block, width * 8, blocks[3], stride=2)
        _init_like_torchvision(net)
    if small_stem:
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    feat_dim = width * 8 * block.expansion
    net.fc = nn.Identity()
    return net, feat_dim


def _init_like_torchvision(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_projector(in_dim: int, mlp_dim: int, dim: int) -> nn.Sequential:
    """The reference's 3-layer projector; indices 0..6 match its checkpoint keys."""
    return nn.Sequential(
        nn.Linear(in_dim, mlp_dim, bias=False),
        nn.BatchNorm1d(mlp_dim),
        nn.ReLU(inplace=True),
        nn.Linear(mlp_dim, mlp_dim, bias=False),
        nn.BatchNorm1d(mlp_dim),
        nn.ReLU(inplace=True),
        nn.Linear(mlp_dim, dim, bias=False),
    )


def backbone_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Average-pooled last-stage features of a ResNet encoder, skipping its ``fc`` head."""
    x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
    x = encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))
    return torch.flatten(encoder.avgpool(x), 1)


class CaCo(nn.Module):
    """Query encoder, its EMA key encoder and the learnable bank (caco.md §1-2).

    One ``forward`` call produces every view's normalised query features and the normalised
    keys of the key views, after the EMA update, so that a DDP wrapper sees a single forward
    per backward (the reason the reference wraps the whole model).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        dim: int = 256,
        mlp_dim: int = 2048,
        bank_size: int = 65536,
        moco_t: float = 0.08,
        mem_t: float = 0.08,
        mem_momentum: float = 0.9,
        *,
        small_stem: bool = False,
        width: int = 64,
        blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("moco_t", moco_t), ("mem_t", mem_t)):
            if value <= 0:
                raise ValueError(f"model.{name} must be positive, got {value}")
        if not 0 <= mem_momentum < 1:
            raise ValueError(f"model.mem_momentum must be in [0, 1), got {mem_momentum}")
        self.arch = arch
        self.moco_t = float(moco_t)
        self.mem_t = float(mem_t)
        self.mem_momentum = float(mem_momentum)
        backbone, self.feature_dim = build_backbone(
            arch, small_stem=small_stem, width=width, blocks=blocks
        )
        backbone.fc = build_projector(self.feature_dim, mlp_dim, dim)
        self.encoder_q = backbone
        self.encoder_k = copy.deepcopy(backbone)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.bank = MemoryBank(dim, bank_size)

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """f_k <- m f_k + (1 - m) f_q on parameters only; BN running statistics are not copied."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(k_params, momentum)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def reset_key_encoder(self) -> None:
        """Make f_k an exact copy of f_q (parameters and buffers)."""
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())

    def forward(
        self,
        views: Sequence[torch.Tensor],
        ema_momentum: float | None = None,
        *,
        query_views: Sequence[int] | None = None,
        key_views: Sequence[int] = (0, 1),
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return ``(queries, keys)``: L2-normalised float32 features.

        ``queries[i]`` comes from ``views[query_views[i]]`` (all views by default) through f_q,
        each view its own forward (its own BN batch). Then f_k is EMA-updated with
        ``ema_momentum`` (skipped when None) and ``keys[j]`` = f_k(``views[key_views[j]]``),
        without gradient.
        """
        idx = range(len(views)) if query_views is None else query_views
        queries = [F.normalize(self.encoder_q(views[i]).float(), dim=1) for i in idx]
        with torch.no_grad():
            if ema_momentum is not None:
                self.ema_update(ema_momentum)
            keys = [F.normalize(self.encoder_k(views[j]).float(), dim=1) for j in key_views]
        return queries, keys

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of the query encoder (what kNN and linear probes use)."""
        return backbone_features(self.encoder_q, x)


class Backbone(nn.Module):
    """A ResNet encoder seen up to its pooled features; its ``fc`` (the projector) is skipped."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return backbone_features(self.encoder, x)


def build_model(model_cfg, seed: int) -> CaCo:
    """A CaCo model whose initial weights (and random bank) depend on ``seed`` only."""
    torch.manual_seed(seed)
    blocks = list(model_cfg.blocks) if model_cfg.get("blocks") is not None else None
    return CaCo(
        model_cfg.arch, dim=model_cfg.dim, mlp_dim=model_cfg.mlp_dim,
        bank_size=model_cfg.bank_size, moco_t=model_cfg.moco_t, mem_t=model_cfg.mem_t,
        mem_momentum=model_cfg.mem_momentum, small_stem=model_cfg.small_stem,
        width=model_cfg.width, blocks=blocks,
    )
