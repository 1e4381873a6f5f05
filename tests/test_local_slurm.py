"""The local SLURM cluster is safe to run as root: it stops only what it started (processes,
namespaces, links), listens on its own addresses only (loopback, the multi-host subnet), keeps
its secrets private and never hands out a job id twice."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT
from slurm_utils import require_cluster

pytestmark = pytest.mark.slurm
STATE = Path(os.environ.get("CACO_SLURM_STATE", "/var/tmp/caco-slurm"))


def _listening(pid: int | str = "self") -> list[tuple[str, int, int]]:
    """(address, port, inode) of every listening TCP socket (IPv4 and IPv6) in the network
    namespace of ``pid`` (a compute host's daemons live in that host's namespace)."""
    out = []
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr, port = fields[1].split(":")
            if len(addr) == 8:
                ip = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                ip = "::" if set(addr) == {"0"} else addr
            out.append((ip, int(port, 16), int(fields[9])))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


# The cluster's own addresses: loopback, and the multi-host cluster's private subnet (the
# login host's bridge and the compute hosts' namespaces). Never all interfaces.
CLUSTER_NET = ("127.", "10.77.0.")


def test_every_daemon_listens_on_the_clusters_own_addresses_only():
    require_cluster()
    daemons = ["mariadbd", "slurmdbd", "slurmctld"]
    daemons += sorted(p.stem for p in (STATE / "run").glob("slurmd*.pid")
                      if not p.name.endswith(".daemon.pid"))
    if (STATE / "tracking.json").exists():
        daemons.append("mlflow")  # its workers hold the socket: count the whole process tree
    assert any(d.startswith("slurmd") for d in daemons), daemons
    for name in daemons:
        pid = int((STATE / "run" / f"{name}.pid").read_text())
        pids = _descendants(pid)
        inodes = set().union(*(_socket_inodes(p) for p in pids))
        mine = [(ip, port) for ip, port, inode in _listening(pid) if inode in inodes]
        assert mine, f"{name} listens nowhere?"
        assert all(ip.startswith(CLUSTER_NET) for ip, _ in mine), (name, mine)


def test_secrets_are_private_and_not_from_the_repository():
    require_cluster()
    secret = STATE / "secrets" / "db_password"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((STATE / "etc" / "slurmdbd.conf").stat().st_mode) == 0o600
    assert stat.S_IMODE(Path("/etc/munge/munge.key").stat().st_mode) == 0o400
    password = secret.read_text().strip()
    assert len(password) >= 16
    assert password not in (ROOT / "launch" / "local_slurm.sh").read_text()


def test_job_ids_continue_above_every_id_handed_out_before():
    require_cluster()
    conf = (STATE / "etc" / "slurm.conf").read_text()
    first = int(next(x for x in conf.splitlines() if x.startswith("FirstJobId=")).split("=")[1])
    assert first > int((STATE / "last_job_id").read_text())
    out = subprocess.run(["sbatch", "--parsable", "--wrap", "true"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().split(";")[0]) >= first


def test_stop_kills_only_what_it_started(tmp_path):
    """A stale PID file naming some other process: stop leaves that process alone."""
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        (state / "run" / "slurmctld.pid").write_text(str(bystander.pid))
        proc = subprocess.run(["bash", str(ROOT / "launch" / "local_slurm.sh"), "stop"],
                              env={**os.environ, "CACO_SLURM_STATE": str(state)},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"not stopping pid {bystander.pid}: it is not slurmctld" in proc.stdout
        assert bystander.poll() is None  # still alive
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_removes_the_namespaces_and_links_its_start_recorded_and_nothing_else(tmp_path):
    """What a crashed start left (a namespace with a process in it, a veth on the machine):
    stop removes exactly that, and the live cluster's hosts and bridge stay."""
    state = tmp_path / "state"
    state.mkdir()
    ns, veth = "caco-t9", "cv-t9"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "cvp-t9"],
                   check=True)
    inside = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"])
    live_before = _netns() - {ns}
    try:
        (state / "net").write_text(f"netns {ns}\nlink {veth}\n")
        proc = subprocess.run(["bash", str(ROOT / "launch" / "local_slurm.sh"), "stop"],
                              env={**os.environ, "CACO_SLURM_STATE": str(state)},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert inside.wait(timeout=10) != 0  # killed, not finished
        assert ns not in _netns()
        assert subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode != 0
        assert not (state / "net").exists()
        assert _netns() - {ns} == live_before  # the running cluster's hosts are untouched
        require_cluster()
    finally:
        inside.kill()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}
