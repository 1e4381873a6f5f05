"""What is refused before anything runs or is submitted: credentials in the tracking URI, a
credentials file others can read, a tracking server that refuses our credentials, SLURM
missing, a sweep that cannot work, a submission SLURM refuses (one message, the config key,
exit 2, no traceback, nothing submitted or left behind)."""

from __future__ import annotations

import http.server
import re
import subprocess
import threading

import pytest
from helpers import clean_failure, run_cli
from slurm_utils import require_cluster


@pytest.mark.parametrize("multirun", [False, True])
def test_credentials_in_the_tracking_uri_are_refused_before_anything_is_written(tmp_path,
                                                                               multirun):
    args = (["-m", "cluster=slurm"] if multirun else []) + [
        "experiment=smoke", f"output_root={tmp_path}",
        "tracking.uri=http://alice:s3cret-pw@127.0.0.1:5999"]
    out = clean_failure(run_cli("pretrain.py", *args, timeout=120), 2,
                       "carries credentials", "MLFLOW_TRACKING_USERNAME",
                       "tracking.credentials_file")
    assert "s3cret-pw" not in out
    assert not any(tmp_path.rglob("*")), list(tmp_path.rglob("*"))  # no run, no sweep dir


def test_a_credentials_file_others_can_read_is_refused(tmp_path):
    creds = tmp_path / "creds"
    creds.write_text("username=alice\npassword=pw\n")
    creds.chmod(0o644)
    clean_failure(run_cli("pretrain.py", "experiment=smoke", f"output_root={tmp_path}/out",
                         f"tracking.credentials_file={creds}", timeout=120), 2,
                 f"tracking.credentials_file={creds} can be read by others",
                 f"chmod 600 {creds}")


class _Refuses(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(401)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"You are not authenticated.")

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_server_that_refuses_the_credentials_stops_the_launch(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        clean_failure(run_cli("pretrain.py", "experiment=smoke", f"output_root={tmp_path}",
                             f"tracking.uri={uri}", "tracking=server", timeout=120),
                     2, "refused the credentials", "MLFLOW_TRACKING_USERNAME")
    finally:
        server.shutdown()
    assert not (tmp_path / "runs").exists()


def test_cluster_slurm_without_slurm_says_so(tmp_path):
    """The launching machine has no SLURM client at all (nothing on PATH)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run_cli("pretrain.py", "-m", "cluster=slurm", "experiment=smoke",
                   f"output_root={tmp_path}/out", timeout=120, env={"PATH": str(empty)})
    clean_failure(proc, 2, "cannot submit to SLURM from this machine", "cluster=local")


# ---------------------------------------------------------------- on the real cluster
def _job_count() -> int:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-S", "2000-01-01"],
                         capture_output=True, text=True, timeout=30).stdout
    return len(out.split())


@pytest.mark.slurm
def test_the_users_command_without_data_root_is_refused_in_one_line(tmp_path):
    require_cluster()
    before = _job_count()
    proc = run_cli("pretrain.py", "-m", "cluster=slurm", "epochs=200,800",
                   f"output_root={tmp_path}", timeout=120)
    clean_failure(proc, 2, "every sweep point: data.root is not set", "experiment=demo",
                 "nothing was submitted")
    assert _job_count() == before
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").iterdir())


@pytest.mark.slurm
@pytest.mark.parametrize(("override", "words", "key"), [
    ("cluster.gpus_per_node=8", "Invalid generic resource (gres)", "cluster.gpus_per_node"),
    ("cluster.partition=nope", "invalid partition specified: nope", "cluster.partition"),
    ("cluster.mem_gb=900000", "Requested node configuration is not available",
     "cluster.mem_gb"),
])
def test_a_submission_slurm_refuses_is_one_message_with_the_key(tmp_path, override, words, key):
    require_cluster()
    before = _job_count()
    proc = run_cli("pretrain.py", "-m", "cluster=slurm", "experiment=smoke", "epochs=1,2",
                   f"output_root={tmp_path}", override, timeout=120)
    out = clean_failure(proc, 2, "SLURM refused", words, f"change {key}"
                       if key != "cluster.mem_gb" else key)
    assert out.count("sbatch: error") <= 2  # SLURM's words once, not printed again
    assert _job_count() == before


@pytest.mark.slurm
def test_a_sweep_is_submitted_whole_or_not_at_all(tmp_path):
    """Two points that need different resources go to two arrays; when SLURM refuses the
    second, the first is cancelled: nothing of the sweep runs."""
    require_cluster()
    proc = run_cli("pretrain.py", "-m", "cluster=slurm", "experiment=smoke",
                   "cluster.gpus_per_node=0,8", f"output_root={tmp_path}", timeout=120)
    out = clean_failure(proc, 2, "cluster.gpus_per_node", "cancelled the 1 job(s) this sweep "
                       "had already submitted")
    job = re.search(r"already submitted \((\d+)", out).group(1)
    states = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job],
                            capture_output=True, text=True).stdout.splitlines()
    assert states and all(s.startswith("CANCELLED") for s in states), states
