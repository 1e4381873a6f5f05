"""Evaluators on real checkpoints: kNN and linear probe by hand, our and the authors' layout."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import compose_pretrain, run_cli

from caco.checkpoint import model_from_checkpoint
from caco.train import Pretrainer
from evals.linear import LARC


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    cfg = compose_pretrain("experiment=smoke", "epochs=1", "tracking.enabled=false",
                           "eval.knn.final=false", f"output_root={root}")
    Pretrainer(cfg, root / "run").run()
    ours = root / "run" / "checkpoints" / "epoch_0001.pt"
    model, _ = model_from_checkpoint(ours)
    state = {f"module.{k}": v for k, v in model.state_dict().items()
             if k.startswith(("encoder_q.", "encoder_k."))}
    reference = root / "checkpoint_0001.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state,
                "Memory_Bank": {"W": model.bank.W, "v": model.bank.V}}, reference)
    return ours, reference


def test_larc_scales_each_parameter_by_its_trust_ratio():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    start = w.detach().clone()
    opt = LARC(torch.optim.SGD([w], lr=0.5, momentum=0.9, weight_decay=0.1))
    g = torch.randn(4, 3)
    w.grad = g.clone()
    opt.step()
    rate = 0.001 * start.norm() / (g.norm() + 0.1 * start.norm() + 1e-8)
    torch.testing.assert_close(w.detach(), start - 0.5 * rate * (g + 0.1 * start))
    assert opt.param_groups[0]["weight_decay"] == 0.1  # restored after the step


def test_reference_layout_rebuilds_the_same_encoder(smoke_checkpoint):
    ours, reference = smoke_checkpoint
    a, info_a = model_from_checkpoint(ours)
    b, info_b = model_from_checkpoint(reference)
    assert info_a["format"] == "caco-toolkit-1" and info_b["format"] == "reference"
    assert (b.encoder_q.conv1.kernel_size, b.bank.W.shape) == ((3, 3), a.bank.W.shape)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_knn_by_hand_gives_the_same_number_for_both_layouts(smoke_checkpoint, tmp_path):
    ours, reference = smoke_checkpoint
    common = ["eval=knn", "eval.knn.train_subset=1000", "eval.knn.test_subset=500",
              f"output_root={tmp_path}"]
    a = run_cli("evaluate.py", f"checkpoint={ours}", *common)
    assert a.returncode == 0, a.stdout + a.stderr
    b = run_cli("evaluate.py", f"checkpoint={reference}", "data=fashion_mnist", *common)
    assert b.returncode == 0, b.stdout + b.stderr
    results = [json.loads(p.read_text())
               for p in (tmp_path / "evals" / "knn").glob("*/metrics.json")]
    assert len(results) == 2
    assert results[0]["knn_top1"] == results[1]["knn_top1"]
    assert 10 < results[0]["knn_top1"] <= 100


def test_linear_probe_cached_learns_and_reference_protocol_runs(smoke_checkpoint, tmp_path):
    from omegaconf import OmegaConf

    from evals import linear

    ours, _ = smoke_checkpoint
    cfg = OmegaConf.create({"device": "cpu", "data": None, "eval": {"linear": {
        "protocol": "cached", "epochs": 20, "batch_size": 256, "lr": 20.0,
        "train_subset": 2000, "test_subset": 500, "num_classes": None}}})
    fast = linear.evaluate(ours, cfg)
    assert fast["linear_cached_top1"] > 40 and fast["epoch"] == 1
    cfg.eval.linear.protocol = "reference"
    cfg.eval.linear.epochs = 1
    ref = linear.evaluate(ours, cfg)
    assert 0 <= ref["linear_top1"] <= 100 and ref["linear_top5"] >= ref["linear_top1"]


def test_evaluate_bad_inputs(smoke_checkpoint, tmp_path):
    _, reference = smoke_checkpoint
    missing = run_cli("evaluate.py", "eval=knn", f"checkpoint={tmp_path}/nope.pt",
                      f"output_root={tmp_path}")
    assert missing.returncode == 2 and "does not exist" in missing.stdout + missing.stderr
    no_data = run_cli("evaluate.py", "eval=knn", f"checkpoint={reference}",
                      f"output_root={tmp_path}")
    out = no_data.stdout + no_data.stderr
    assert no_data.returncode == 2 and "does not record its dataset" in out
    assert "Traceback" not in out


DET = ("eval.detection.data.train=40", "eval.detection.data.val=16", "eval.detection.iterations=4",
       "eval.detection.batch_size=4", "eval.detection.fpn_first_stage=2",
       "eval.detection.anchor_sizes=[16,32,64,128]", "eval.detection.fpn_channels=16",
       "eval.detection.representation_size=64", "eval.detection.threads=1")


def test_detection_transfer_with_its_random_init_baseline(smoke_checkpoint, tmp_path):
    ours, _ = smoke_checkpoint
    proc = run_cli("evaluate.py", "eval=detection", f"checkpoint={ours}",
                   f"output_root={tmp_path}", "device=cpu", *DET, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (metrics_file,) = tmp_path.glob("evals/detection/*/metrics.json")
    m = json.loads(metrics_file.read_text())
    for key in ("det_AP", "det_AP50", "det_AP75", "det_AP50_random_init"):
        assert 0.0 <= m[key] <= 100.0, m
    assert m["variant"] == "fpn" and "note_supervised" in m  # no ImageNet weights on disk
    scenes = next(tmp_path.glob("data/det_scenes_*"))
    coco = json.loads((scenes / "val" / "annotations.json").read_text())
    assert len(coco["images"]) == 16 and len(coco["categories"]) == 10
    for a in coco["annotations"]:  # boxes lie inside the 128 px canvas
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128 and w > 0 and h > 0


def test_c4_head_uses_res5_as_the_box_head(smoke_checkpoint):
    from omegaconf import OmegaConf

    from evals.detection import build_detector

    model, _ = model_from_checkpoint(smoke_checkpoint[0])
    d = OmegaConf.load("configs/eval/detection.yaml").detection
    d.variant, d.anchor_sizes = "c4", [16, 32, 64]
    det = build_detector(model.encoder_q, d, 11, (0.5,) * 3, (0.25,) * 3)
    assert det.roi_heads.box_head[0] is not model.encoder_q.layer4  # a copy...
    torch.testing.assert_close(det.roi_heads.box_head[0][0].conv1.weight,
                               model.encoder_q.layer4[0].conv1.weight)  # ...of res5
    assert all(type(m) is torch.nn.BatchNorm2d for m in det.backbone.modules()
               if "BatchNorm" in type(m).__name__)  # trainable BN, not FrozenBatchNorm2d
    det.eval()
    with torch.no_grad():
        out = det([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_voc_annotations_become_coco(tmp_path):
    from caco.data.detection import CocoDetection, voc_to_coco

    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    from PIL import Image

    Image.new("RGB", (50, 40), (120, 30, 30)).save(root / "JPEGImages" / "000001.jpg")
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    (root / "Annotations" / "000001.xml").write_text(
        "<annotation><size><width>50</width><height>40</height></size>"
        "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>5</xmin><ymin>6</ymin>"
        "<xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>")
    ds = CocoDetection(tmp_path, data=voc_to_coco([root], "test"))
    image, target = ds[0]
    assert image.shape == (3, 40, 50)
    assert target["labels"].tolist() == [12]  # dog, 1-based
    assert target["boxes"].tolist() == [[4.0, 5.0, 20.0, 30.0]]


def test_detection_bad_inputs_are_one_message(smoke_checkpoint, tmp_path):
    ours, _ = smoke_checkpoint
    empty = tmp_path / "coco"
    for split in ("train", "val"):
        (empty / split / "images").mkdir(parents=True)
        (empty / split / "annotations.json").write_text(json.dumps(
            {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    cases = {
        "eval.detection.data.format=coco eval.detection.data.root=/nonexistent/coco":
            "/nonexistent/coco does not exist",
        f"eval.detection.data.format=coco eval.detection.data.root={empty}": "has no images",
        "eval.detection.variant=c5": "eval.detection.variant='c5'",
    }
    for overrides, message in cases.items():
        proc = run_cli("evaluate.py", "eval=detection", f"checkpoint={ours}",
                       f"output_root={tmp_path}", *DET, *overrides.split())
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and message in out and "Traceback" not in out, out
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    proc = run_cli("evaluate.py", "eval=detection", f"checkpoint={corrupt}",
                   f"output_root={tmp_path}")
    assert proc.returncode == 2 and "corrupt.pt" in proc.stdout + proc.stderr


def test_pixel_baseline_is_the_same_knn_on_the_flattened_images(smoke_checkpoint):
    from omegaconf import OmegaConf

    from caco.data.pretrain import build_eval_loader
    from caco.knn import knn_classify
    from evals.knn import evaluate

    ours, _ = smoke_checkpoint
    knn = {"k": 10, "temperature": 0.1, "train_subset": 600, "test_subset": 300,
           "batch_size": 128, "pixels_baseline": True, "random_init_baseline": False}
    cfg = OmegaConf.create({"eval": {"knn": knn}, "device": "cpu", "data": None})
    got = evaluate(ours, cfg)
    data = OmegaConf.create(torch.load(ours, weights_only=True)["config"]["data"])

    def pixels(split, n):
        images, labels = zip(*build_eval_loader(data, split, 128, n))
        return torch.cat(images).flatten(1), torch.cat(labels)

    (xtr, ytr), (xte, yte) = pixels("train", 600), pixels("val", 300)
    plain = knn_classify(xtr, ytr, xte, yte, k=10, temperature=0.1)
    mean = xtr.mean(0, keepdim=True)
    centred = knn_classify(xtr - mean, ytr, xte - mean, yte, k=10, temperature=0.1)
    assert got["knn_top1_pixels"] == pytest.approx(plain["top1"])
    assert got["knn_top1_pixels_centred"] == pytest.approx(centred["top1"])
    assert got["knn_top1_pixels"] != got["knn_top1"]  # not the encoder's number
