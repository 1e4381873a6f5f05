"""The in-loop kNN monitor (``eval.knn.every``): ``train/knn_top1`` every N epochs on rank 0.

Only a training-time signal; the run's kNN results (``eval/knn_top1`` per checkpoint, with the
random-init baseline) come from the evaluation DAG's kNN node.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from caco.runtime import Runtime, show_progress

log = logging.getLogger(__name__)


class KnnMonitor:
    def __init__(self, cfg: DictConfig, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        knn = cfg.get("eval", {}).get("knn")
        self.every = int(knn.get("every") or 0) if knn is not None else 0
        self._data = None

    def after_epoch(self, model, epoch: int) -> dict[str, float]:
        """``{'train/knn_top1': ...}`` when this epoch is monitored (on rank 0), else {}.
        Every rank extracts the features of its share of both splits (no rank idles)."""
        if not (self.every and epoch % self.every == 0):
            return {}
        from caco.knn import knn_accuracy, knn_loaders
        from caco.model import Backbone

        k = self.cfg.eval.knn
        if self._data is None:
            self._data = knn_loaders(self.cfg.data, k, shard=(self.rt.rank, self.rt.world))
        result = knn_accuracy(Backbone(model.encoder_q), *self._data, k=k.k,
                              temperature=k.temperature, device=self.rt.device,
                              channels_last=self.rt.channels_last,
                              autocast_dtype=self.rt.autocast_dtype,
                              progress=show_progress(self.cfg.get("progress", "auto")))
        if not self.rt.is_main:
            return {}
        log.info("kNN monitor after epoch %d: top-1 %.2f", epoch, result["top1"])
        return {"train/knn_top1": result["top1"]}
