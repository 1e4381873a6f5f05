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
    from caco.data.pretrain import build_eval_loader
    from evals.common import prepare

    k = cfg.eval.knn
    e = prepare(checkpoint, cfg)
    train = build_eval_loader(e.data, "train", k.batch_size, k.train_subset)
    test = build_eval_loader(e.data, "val", k.batch_size, k.test_subset)
    train_f, train_y = extract_features(e.backbone, train, device=e.device, desc="kNN train")
    test_f, test_y = extract_features(e.backbone, test, device=e.device, desc="kNN test")
    result = knn_classify(train_f, train_y, test_f, test_y, k=k.k, temperature=k.temperature,
                          device=e.device)
    return {"knn_top1": result["top1"], "knn_top5": result["top5"], "epoch": e.info["epoch"]}
