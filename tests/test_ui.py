"""The MLflow UI as a user sees it: a real tracking server on 127.0.0.1, a two-point sweep
with its evaluation DAG, and headless Chromium (Debian's chromium) rendering the experiment's
run list and the compare page printed by ``launch/compare.py``. The screenshots are kept in
``tests/artifacts/ui/``. Chromium is required (installed by ``launch/setup.sh --dev``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import pytest
from helpers import ROOT, run_cli

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "tests" / "artifacts" / "ui"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is required for the UI test: apt-get install chromium "
                "(bash launch/setup.sh --dev installs it)")


def render(url: str, name: str) -> str:
    """The page's DOM after its scripts ran; a screenshot is kept as ``<name>.png``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    common = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--window-size=1600,1000", "--virtual-time-budget=20000"]
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([_chromium(), *common, f"--user-data-dir={profile}",
                        f"--screenshot={ARTIFACTS / (name + '.png')}", url],
                       capture_output=True, timeout=180)
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([_chromium(), *common, f"--user-data-dir={profile}",
                              "--dump-dom", url], capture_output=True, text=True, timeout=180)
    (ARTIFACTS / f"{name}.html").write_text(dom.stdout)
    return dom.stdout


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory, mlflow_server):
    """A two-point sweep logging to the session's server, in an experiment of its own."""
    root = tmp_path_factory.mktemp("ui")
    server = mlflow_server
    proc = run_cli("pretrain.py", "-m", "experiment=smoke", "dag=smoke", "tracking=server",
                   f"tracking.uri={server.uri}", "tracking.experiment=ui",
                   f"output_root={root}", "epochs=1",
                   "seed=0,1", "~dag.nodes.linear", "dag.nodes.report.needs=[knn]",
                   "data.train_subset=128", "hydra.sweep.subdir=${hydra.job.num}_seed${seed}",
                   timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"server": server, "root": root}


def test_runs_and_their_evaluation_metrics_render_in_the_mlflow_ui(tracked_sweep):
    server = tracked_sweep["server"]
    cmp = run_cli("compare.py", "--tracking-uri", server.uri, "--experiment", "ui")
    assert cmp.returncode == 0, cmp.stderr
    lines = cmp.stdout.splitlines()
    assert "eval/knn_top1" in lines[0] and len([x for x in lines if "FINISHED" in x]) == 2
    url = re.search(r"compare in MLflow: (\S+)", cmp.stdout).group(1)
    assert url.startswith(server.uri + "/#/compare-runs?runs=")
    experiment = json.loads(re.search(r"experiments=(\S+)", url).group(1)
                            .replace("%5B", "[").replace("%5D", "]").replace("%22", '"'))[0]
    names = [line.split()[0] for line in lines[2:] if line.strip()][:2]
    assert sorted(names) == ["0_seed0", "1_seed1"]

    runs_page = render(f"{server.uri}/#/experiments/{experiment}/runs", "run_list")
    for name in names:
        assert name in runs_page, f"run {name} not in the rendered run list"
    compare_page = render(url, "compare")
    for name in names:
        assert name in compare_page, f"run {name} not on the rendered compare page"
    assert "eval/knn_top1" in compare_page and "eval/dag_failed_nodes" in compare_page
    assert (ARTIFACTS / "compare.png").stat().st_size > 10_000
