"""kNN evaluation (InstDisc protocol): weighted vote of the k nearest training features.

``knn_classify(train_features, train_labels, test_features, test_labels, *, k=20,
temperature=0.07, num_classes=None)`` returns ``{'top1', 'top5'}`` in percent. The maths
lives in :mod:`caco.knn` so the trainer's in-loop monitor can use it without importing
``evals`` (data flows one way); this module is the evaluator's public face.
"""

import os

from omegaconf import DictConfig

from caco.errors import ConfigError
from caco.knn import extract_features, knn_classify

__all__ = ["evaluate", "extract_features", "knn_classify"]


def evaluate(checkpoint: str | os.PathLike, cfg: DictConfig) -> dict[str, float]:
    """kNN top-1/top-5 of a checkpoint's backbone: train split as memory, val split as queries."""
    from caco.knn import knn_accuracy, knn_loaders
    from evals.common import prepare

    k = cfg.eval.knn
    e = prepare(checkpoint, cfg)
    loaders = knn_loaders(e.data, k)
    result = knn_accuracy(e.backbone, *loaders, k=k.k, temperature=k.temperature,
                          device=e.device, feature_dtype=str(k.get("feature_dtype", "fp32")))
    out = {"knn_top1": result["top1"], "knn_top5": result["top5"], "epoch": e.info["epoch"]}
    # Next to the run's final checkpoint only (a DAG node says which one it evaluates).
    if k.get("random_init_baseline") and cfg.get("final_checkpoint", True):
        out.update(_random_init_baseline(e, loaders, k))
    if k.get("pixels_baseline") and cfg.get("final_checkpoint", True):
        out.update(pixels_baseline(loaders, k, e.device))
    return out


def pixels_baseline(loaders, k, device) -> dict[str, float]:
    """The same kNN on the images themselves (the eval transform's pixels, flattened): what
    an encoder has to beat to have learned anything beyond its input. ``knn_top1_pixels``
    uses the features' protocol (L2-normalised); ``knn_top1_pixels_centred`` first removes
    the train split's mean image, the stronger of the two."""
    from torch import nn

    from caco.knn import extract_features, knn_classify

    train_f, train_y = extract_features(nn.Flatten(), loaders[0], device=device)
    test_f, test_y = extract_features(nn.Flatten(), loaders[1], device=device)
    plain = knn_classify(train_f, train_y, test_f, test_y, k=k.k, temperature=k.temperature,
                         device=device)
    mean = train_f.mean(dim=0, keepdim=True)
    centred = knn_classify(train_f - mean, train_y, test_f - mean, test_y, k=k.k,
                           temperature=k.temperature, device=device)
    return {"knn_top1_pixels": plain["top1"], "knn_top5_pixels": plain["top5"],
            "knn_top1_pixels_centred": centred["top1"]}


def _random_init_baseline(e, loaders, k) -> dict[str, float]:
    """The same architecture at the run's own random initialisation (same seed)."""
    from omegaconf import OmegaConf

    from caco.knn import knn_accuracy
    from caco.model import Backbone, build_model

    config = e.info.get("config") or {}
    if "model" not in config or "seed" not in config:
        raise ConfigError("eval.knn.random_init_baseline needs a caco-toolkit checkpoint (it "
                          "records the model config and seed); set it to false")
    model = build_model(OmegaConf.create(config["model"]), int(config["seed"]))
    base = knn_accuracy(Backbone(model.encoder_q).to(e.device).eval(), *loaders, k=k.k,
                        temperature=k.temperature, device=e.device,
                        feature_dtype=str(k.get("feature_dtype", "fp32")))
    return {"knn_top1_random_init": base["top1"], "knn_top5_random_init": base["top5"]}
