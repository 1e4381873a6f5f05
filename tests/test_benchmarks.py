"""The benchmark commands a GPU-less machine can run: bench=gpu refuses in one line (exit 2),
bench=knn prints its JSON with the memory it took beyond its inputs (bounded), bench=augment
times the colour stage against the reference's per-image pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: tests/test_gpu.py runs")
def test_the_gpu_benchmark_without_a_gpu_says_so_and_exits_2(tmp_path):
    proc = run_cli("benchmark.py", "bench=gpu", f"output_root={tmp_path}", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "bench=gpu needs a CUDA GPU and this machine has none" in out
    assert "Traceback" not in out


def test_the_knn_benchmark_keeps_one_copy_of_the_bank(tmp_path):
    proc = run_cli("benchmark.py", "bench=knn", "bench.train_size=200000", "bench.queries=3000",
                   "bench.threads=2", f"output_root={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["queries"] == 3000 and result["seconds"] > 0 and 0 <= result["top1"] <= 100
    # One normalised copy of the bank plus similarity blocks; a full (queries x train)
    # similarity matrix would be 8 banks, a copy per query chunk 12.
    assert result["peak_extra_over_bank"] < 3.0, result


def test_the_colour_stage_benchmark_times_it_against_the_per_image_reference(tmp_path):
    proc = run_cli("benchmark.py", "bench=augment", "bench.image_size=32",
                   "bench.batch_size=32", "bench.rounds=2", f"output_root={tmp_path}",
                   timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == "fashion-mnist scenes"
    assert result["stage_ms_per_batch"] > 0 and result["reference_ms_per_batch"] > 0
    assert result["ratio"] == pytest.approx(
        result["reference_ms_per_batch"] / result["stage_ms_per_batch"], abs=0.01)
    assert result["host_syncs_per_batch"] == 0


def test_the_gpu_benchmark_and_gpu_tests_import_no_mlflow_ffcv_or_submitit():
    """A bare GPU machine has torch and torchvision only (launch/gpu_check.sh)."""
    import subprocess
    import sys

    from helpers import ROOT

    code = ("import sys; sys.path[:0] = ['tests']; import caco.bench.gpu, caco.bench.augment, "
            "evals.linear, test_gpu; bad = [m for m in ('mlflow', 'ffcv', 'submitit') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
