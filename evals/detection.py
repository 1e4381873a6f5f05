"""Detection transfer: Faster R-CNN (torchvision) with the pretrained ResNet as its backbone.

Two heads (``eval.detection.variant``):

- ``fpn``: the ResNet's four stages feed a feature pyramid; the CPU protocol.
- ``c4``: stem + res2-res4 as the trunk and res5 as the box head on 14x14 RoI features
  (detectron2's R50-C4, the community MoCo protocol: VOC07+12 trainval, VOC07 test, 24k
  iterations at batch 16, SyncBN across GPUs, no frozen stages); the GPU/cluster protocol,
  about 15x slower per iteration than FPN on a CPU.

Every BatchNorm stays a trainable BatchNorm and every stage trains (``freeze_backbone`` to
freeze the ResNet instead), images are not resized beyond ``min_size``/``max_size``, the model
normalises with the encoder's own mean/std, anchors suit the data's object sizes, and the
score threshold is low (0.01) as AP needs. The same recipe also runs from a random
initialisation (and from torchvision's supervised ImageNet weights when they are on disk), so
the numbers are read relative to those baselines: ``det_AP50`` vs ``det_AP50_random_init``.
AP, AP50, AP75 come from pycocotools (x100).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from caco.errors import ConfigError, DataError
from caco.runtime import show_progress

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ data
def datasets(d: DictConfig, output_root: str = "./outputs"):
    from caco.data.detection import (
        CocoDetection,
        default_scenes_root,
        ensure_generated_scenes,
        voc_to_coco,
    )

    data = d.data
    fmt = str(data.format)
    if fmt == "generated":
        root = data.get("root") or default_scenes_root(output_root, data)
        root = ensure_generated_scenes(root, train=int(data.train), val=int(data.val),
                                       canvas=int(data.canvas), max_items=int(data.max_items),
                                       seed=int(data.get("seed", 0)))
        return CocoDetection(root / "train"), CocoDetection(root / "val")
    if data.get("root") is None:
        raise DataError(f"eval.detection.data.root is not set (format {fmt})")
    root = Path(str(data.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"eval.detection.data.root={root} does not exist")
    if fmt == "coco":
        return CocoDetection(root / "train"), CocoDetection(root / "val")
    if fmt == "voc":
        def split(names):
            parts = [str(n).split("/") for n in names]
            coco = voc_to_coco([root / p[0] for p in parts], parts[0][1])
            return CocoDetection(root, data=coco)
        return split(data.train_sets), split(data.val_sets)
    raise ConfigError(f"eval.detection.data.format={fmt!r}: use generated, coco or voc")


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


# ------------------------------------------------------------------ models
def _stage_channels(encoder: nn.Module) -> list[int]:
    out = []
    for i in range(1, 5):
        bns = [m for m in getattr(encoder, f"layer{i}")[-1].modules()
               if isinstance(m, nn.BatchNorm2d)]
        out.append(bns[-1].num_features)
    return out


def build_detector(encoder: nn.Module, d: DictConfig, num_classes: int, mean, std) -> nn.Module:
    """Faster R-CNN around a torchvision ResNet ``encoder`` (its ``fc`` is not used)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    encoder = copy.deepcopy(encoder)
    if d.get("freeze_backbone"):
        for p in encoder.parameters():
            p.requires_grad_(False)
    channels = _stage_channels(encoder)
    sizes = tuple(int(s) for s in d.anchor_sizes)
    ratios = (0.5, 1.0, 2.0)
    common = dict(min_size=int(d.min_size), max_size=int(d.max_size), image_mean=list(mean),
                  image_std=list(std), box_score_thresh=float(d.score_thresh),
                  box_detections_per_img=int(d.get("detections_per_img", 100)))
    for key in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                "rpn_batch_size_per_image", "box_batch_size_per_image"):
        if d.get(key):
            common[key] = int(d[key])
    if d.variant == "fpn":
        from torchvision.models.detection.backbone_utils import BackboneWithFPN
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        first = int(d.get("fpn_first_stage", 1))
        if first not in (1, 2, 3):
            raise ConfigError(f"eval.detection.fpn_first_stage={first}: use 1, 2 or 3")
        stages = list(range(first, 5))
        backbone = BackboneWithFPN(
            encoder, return_layers={f"layer{i}": str(k) for k, i in enumerate(stages)},
            in_channels_list=[channels[i - 1] for i in stages],
            out_channels=int(d.fpn_channels), extra_blocks=LastLevelMaxPool())
        levels = len(stages) + 1
        if len(sizes) != levels:
            raise ConfigError(f"eval.detection.anchor_sizes={list(sizes)}: the FPN variant "
                              f"from stage {first} needs one size per level ({levels})")
        anchors = AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * levels)
        from torchvision.models.detection.faster_rcnn import TwoMLPHead

        rep = int(d.get("representation_size", 1024))
        head = TwoMLPHead(int(d.fpn_channels) * 7 * 7, rep)
        return FasterRCNN(backbone, rpn_anchor_generator=anchors, box_head=head,
                          box_predictor=FastRCNNPredictor(rep, num_classes), **common)
    if d.variant == "c4":
        trunk = nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool,
                              encoder.layer1, encoder.layer2, encoder.layer3)
        trunk.out_channels = channels[2]
        head = nn.Sequential(encoder.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        anchors = AnchorGenerator((sizes,), (ratios,))
        return FasterRCNN(trunk, rpn_anchor_generator=anchors,
                          box_roi_pool=MultiScaleRoIAlign(["0"], output_size=14,
                                                          sampling_ratio=0),
                          box_head=head, box_predictor=FastRCNNPredictor(channels[3],
                                                                         num_classes),
                          **common)
    raise ConfigError(f"eval.detection.variant={d.variant!r}: use fpn or c4")


def supervised_encoder(arch: str) -> nn.Module | None:
    """torchvision's ImageNet weights for ``arch`` if they are already on disk, else None."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    except (ValueError, AttributeError):
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.exists():
        return None
    model = torchvision.models.get_model(arch)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


# ------------------------------------------------------------------ train / test
def train_detector(model: nn.Module, train_ds, d: DictConfig, device: torch.device,
                   seed: int = 0, progress: bool = False) -> float:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    iters, batch = int(d.iterations), int(d.batch_size)
    sampler = torch.utils.data.RandomSampler(train_ds, replacement=True,
                                             num_samples=iters * batch, generator=g)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=batch, sampler=sampler,
                                         collate_fn=_collate, num_workers=0)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = float(d.lr) * batch / 16
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=float(d.weight_decay))
    warmup = max(1, int(d.warmup_iters))
    model.to(device).train()
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iters, desc="detection", leave=False)
    loss_value = float("nan")
    for it, (images, targets) in enumerate(loader):
        scale = min(1.0, (it + 1) / warmup)
        for group in opt.param_groups:
            group["lr"] = lr * scale * (0.1 if it >= int(0.8 * iters) else 1.0)
        images = [im.to(device).float().div_(255) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise RuntimeError(f"detection loss became {loss.item()} at iteration {it + 1}; "
                               "lower eval.detection.lr")
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    log.info("detector trained: %d iterations in %.0f s, last loss %.3f", iters,
             time.perf_counter() - t0, loss_value)
    return loss_value


@torch.no_grad()
def coco_ap(model: nn.Module, val_ds, device: torch.device, batch_size: int = 8
            ) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    model.to(device).eval()
    loader = torch.utils.data.DataLoader(val_ds, batch_size=batch_size, collate_fn=_collate)
    results: list[dict[str, Any]] = []
    for images, targets in loader:
        outputs = model([im.to(device).float().div_(255) for im in images])
        for out, t in zip(outputs, targets):
            for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                         out["labels"].tolist()):
                x0, y0, x1, y1 = box
                results.append({"image_id": t["image_id"], "category_id": int(label),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    if not results:  # pycocotools fails on an empty result list; nothing found = AP 0
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        dets = val_ds.coco.loadRes(results)
        ev = COCOeval(val_ds.coco, dets, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": 100 * float(ev.stats[0]), "AP50": 100 * float(ev.stats[1]),
            "AP75": 100 * float(ev.stats[2])}


def transfer(encoder: nn.Module, train_ds, val_ds, d: DictConfig, device: torch.device,
             mean, std, seed: int = 0) -> dict[str, float]:
    """One fine-tuning run from ``encoder``: train, then COCO AP on the val split."""

    model = build_detector(encoder, d, len(train_ds.categories) + 1, mean, std)
    train_detector(model, train_ds, d, device, seed=seed, progress=show_progress())
    return coco_ap(model, val_ds, device)


def evaluate(checkpoint: str | os.PathLike, cfg: DictConfig) -> dict[str, Any]:
    """Detection AP of a checkpoint's encoder, next to the same recipe's baselines."""
    from omegaconf import OmegaConf

    from caco.model import build_model
    from evals.common import prepare

    d = cfg.eval.detection
    if d.get("threads"):
        torch.set_num_threads(int(d.threads))
    e = prepare(checkpoint, cfg)
    train_ds, val_ds = datasets(d, str(cfg.get("output_root") or "./outputs"))
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise DataError("the detection train or val split is empty")
    mean, std = tuple(e.data.mean), tuple(e.data.std)
    out: dict[str, Any] = {"epoch": e.info["epoch"], "variant": str(d.variant)}
    res = transfer(e.model.encoder_q, train_ds, val_ds, d, e.device, mean, std)
    out.update({f"det_{k}": v for k, v in res.items()})
    baselines = list(d.get("baselines") or [])
    if "random_init" in baselines:
        config = e.info.get("config") or {}
        if "model" in config:
            base = build_model(OmegaConf.create(config["model"]), int(config.get("seed", 0)))
            res = transfer(base.encoder_q, train_ds, val_ds, d, e.device, mean, std)
            out.update({f"det_{k}_random_init": v for k, v in res.items()})
        else:
            out["note_random_init"] = "no model config in the checkpoint"
    if "supervised" in baselines:
        sup = supervised_encoder(e.info.get("arch", ""))
        small = (e.info.get("config") or {}).get("model", {})
        if sup is None or small.get("small_stem") or (small.get("width") or 64) != 64 \
                or small.get("blocks"):
            out["note_supervised"] = ("no torchvision ImageNet weights on disk for this "
                                      "architecture")
        else:
            res = transfer(sup, train_ds, val_ds, d, e.device,
                           (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            out.update({f"det_{k}_supervised": v for k, v in res.items()})
    return out
