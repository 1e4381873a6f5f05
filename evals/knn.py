"""kNN evaluation (InstDisc protocol): weighted vote of the k nearest training features.

``knn_classify(train_features, train_labels, test_features, test_labels, *, k=20,
temperature=0.07, num_classes=None)`` returns ``{'top1', 'top5'}`` in percent. The maths
lives in :mod:`caco.knn` so the trainer's in-loop monitor can use it without importing
``evals`` (data flows one way); this module is the evaluator's public face.
"""

from caco.knn import extract_features, knn_classify

__all__ = ["extract_features", "knn_classify"]
