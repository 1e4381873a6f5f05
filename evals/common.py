"""What every evaluator shares: the checkpoint's encoder, the device, the data config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from caco.checkpoint import model_from_checkpoint, read_checkpoint
from caco.errors import ConfigError
from caco.model import Backbone, CaCo
from caco.runtime import resolve_device, tune_for


def load_backbone(checkpoint: str | os.PathLike, device: torch.device
                  ) -> tuple[Backbone, CaCo, dict]:
    ckpt = read_checkpoint(checkpoint)
    model, info = model_from_checkpoint(ckpt)
    info["config"] = ckpt.get("config")
    model = model.to(device).eval()
    return Backbone(model.encoder_q), model, info


def data_config(cfg: DictConfig, info: dict[str, Any]) -> DictConfig:
    """``data=`` when given, else the data the checkpoint was pretrained on."""
    if cfg.get("data") is not None:
        return cfg.data
    stored = (info.get("config") or {}).get("data")
    if stored is None:
        raise ConfigError("this checkpoint does not record its dataset: pass data=<name> "
                          "data.root=<path> (e.g. data=imagenet data.root=/data/imagenet)")
    return OmegaConf.create(stored)


@dataclass
class EvalSetup:
    device: torch.device
    backbone: Backbone
    model: CaCo
    info: dict
    data: DictConfig


def prepare(checkpoint: str | os.PathLike, cfg: DictConfig) -> EvalSetup:
    """Device, the checkpoint's backbone (eval mode) and the data config to evaluate on."""
    device = resolve_device(str(cfg.get("device", "auto")))
    tune_for(device)
    backbone, model, info = load_backbone(checkpoint, device)
    return EvalSetup(device, backbone, model, info, data_config(cfg, info))
