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

from caco.tracking import ui_link

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
    assert url.endswith("&workflowType=machine_learning")
    experiment = json.loads(re.search(r"experiments=([^&\s]+)", url).group(1)
                            .replace("%5B", "[").replace("%5D", "]").replace("%22", '"'))[0]
    names = [line.split()[0] for line in lines[2:] if line.strip()][:2]
    assert sorted(names) == ["0_seed0", "1_seed1"]

    runs_page = render(ui_link(f"experiments/{experiment}/runs", server.uri), "run_list")
    for name in names:
        assert name in runs_page, f"run {name} not in the rendered run list"
    compare_page = render(url, "compare")
    for name in names:
        assert name in compare_page, f"run {name} not on the rendered compare page"
    assert "eval/knn_top1" in compare_page and "eval/dag_failed_nodes" in compare_page
    assert (ARTIFACTS / "compare.png").stat().st_size > 10_000


def _experiment_id(server, name: str = "ui") -> str:
    from caco.tracking import client

    return client(server.uri).get_experiment_by_name(name).experiment_id


def test_the_experiment_opens_on_its_runs_and_the_parent_links_its_evaluations(tracked_sweep):
    from caco.tracking import client

    server = tracked_sweep["server"]
    exp = _experiment_id(server)
    assert client(server.uri).get_experiment(exp).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    # A plain link opens MLflow 3's GenAI view (traces), with no run on it: ours do not.
    page = render(ui_link(f"experiments/{exp}", server.uri), "experiment")
    assert "0_seed0" in page and "1_seed1" in page, "the experiment did not open on its runs"

    run_dir = next(p.parent for p in tracked_sweep["root"].glob("**/0_seed0/config.yaml"))
    parent = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    note = client(server.uri).get_run(parent).data.tags["mlflow.note.content"]
    assert "e0001-knn" in note and "report/index.html" in note
    page = render(ui_link(f"experiments/{exp}/runs/{parent}", server.uri), "parent_run")
    assert "e0001-knn" in page and "report/index.html" in page, "no description on the run"
    page = render(ui_link(f"experiments/{exp}/runs/{parent}/artifactPath/report/index.html",
                          server.uri), "report_artifact")
    assert "eval_metrics.png" in page and "index.html" in page


def test_the_sweep_report_renders_with_its_charts_and_compare_writes_one(tracked_sweep):
    import time

    from caco.dag.admin import run_dirs

    sweep_dir = next(tracked_sweep["root"].glob("**/0_seed0/config.yaml")).parent.parent
    before = run_dirs(sweep_dir)[0]
    t0 = time.perf_counter()
    proc = run_cli("report.py", str(sweep_dir))
    print(f"report.py of the 2-run sweep: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run_dirs(sweep_dir)[0] == before and len(before) == 2  # report/ is no run
    page = render((sweep_dir / "report" / "index.html").as_uri(), "sweep_report")
    drawn = re.findall(r'data-drawn="(\d+)x(\d+)"', page)
    assert len(drawn) == 4 and all(int(w) > 300 and int(h) > 150 for w, h in drawn), drawn
    assert "0_seed0" in page and "1_seed1" in page and "knn_top1" in page
    assert (ARTIFACTS / "sweep_report.png").stat().st_size > 20_000

    server = tracked_sweep["server"]
    out = tracked_sweep["root"] / "compare_report"
    cmp = run_cli("compare.py", "--tracking-uri", server.uri, "--experiment", "ui",
                  "--sort", "eval/knn_top1", "--html", str(out))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    rows = [line.split() for line in cmp.stdout.splitlines()[2:4]]
    column = cmp.stdout.splitlines()[0].split().index("eval/knn_top1")
    assert float(rows[0][column]) >= float(rows[1][column])
    assert f"report of 2 run(s): {out / 'index.html'}" in cmp.stdout
    bad = run_cli("compare.py", "--tracking-uri", server.uri, "--experiment", "ui",
                  "--sort", "eval/nothing")
    assert bad.returncode == 2 and "no listed run has this metric" in bad.stderr
