"""kNN evaluation (InstDisc protocol): weighted vote of the k nearest training features.

``knn_classify(train_features, train_labels, test_features, test_labels, *, k=20,
temperature=0.07, num_classes=None)`` returns ``{'top1', 'top5'}`` in percent. The maths
lives in :mod:`caco.knn` so the trainer's in-loop monitor can use it without importing
``evals`` (data flows one way); this module is the evaluator's public face.
"""

import os

from omegaconf import DictConfig

from caco.knn import extract_features, knn_classify

__all__ = ["evaluate", "extract_features", "knn_classify"]


def evaluate(checkpoint: str | os.PathLike, cfg: DictConfig) -> dict[str, float]:
    """kNN top-1/top-5 of a checkpoint's backbone: train split as memory, val split as queries."""
    from caco.knn import knn_accuracy, knn_loaders
    from evals.common import prepare

    k = cfg.eval.knn
    e = prepare(checkpoint, cfg)
    result = knn_accuracy(e.backbone, *knn_loaders(e.data, k), k=k.k,
                          temperature=k.temperature, device=e.device)
    return {"knn_top1": result["top1"], "knn_top5": result["top5"], "epoch": e.info["epoch"]}
