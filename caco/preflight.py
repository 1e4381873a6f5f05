"""Checks of a composed pretraining config that can run before anything starts or is submitted.

``check_pretrain(cfg)`` is called by ``launch/pretrain.py`` for a local run and, through the
``caco_slurm`` launcher's ``preflight`` hook, for every sweep point in the launching process,
before a single job is submitted. Each failure is a :class:`caco.errors.CacoError` whose
message is the same one line a local run gives (naming the key and the fix).
"""

from __future__ import annotations

from omegaconf import DictConfig

from caco.errors import ConfigError


def job_world(cfg: DictConfig) -> int:
    """Processes of one pretraining job: nodes x tasks on SLURM, one locally."""
    c = cfg.cluster
    if str(c.get("name", "local")) != "slurm":
        return 1
    return int(c.get("nodes", 1)) * int(c.get("tasks_per_node", 1))


def _check_switches(cfg: DictConfig, local: bool) -> None:
    from caco.runtime import resolve_device

    if str(cfg.precision) not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision={cfg.precision!r}: use auto, fp32 or bf16")
    for key in ("channels_last", "compile"):
        value = cfg.get(key)
        if value != "auto" and not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: use auto, true or false")
    device = str(cfg.device)
    if local:
        resolve_device(device)  # a GPU must be visible here
    elif device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r}: use auto, cpu or cuda")
    if not local and device.startswith("cuda") and int(cfg.cluster.get("gpus_per_node", 0)) < 1:
        raise ConfigError(f"device={device} but cluster.gpus_per_node=0: request GPUs "
                          "(cluster.gpus_per_node) or use device=cpu")


def check_pretrain(cfg: DictConfig) -> None:
    """Everything about ``cfg`` that can be known to fail before training starts."""
    from caco.dag.plan import parse_dag
    from caco.data.sources import check_available
    from caco.tracking import check_settings
    from caco.train import validate

    local = str(cfg.cluster.get("name", "local")) != "slurm"
    validate(cfg, job_world(cfg))
    _check_switches(cfg, local)
    check_available(cfg.data)
    if str(cfg.data.get("loader", "torch")) == "ffcv":
        from caco.data.ffcv_loader import existing_beton

        existing_beton(cfg.data, "train")

    from caco.dag.plan import dag_nodes

    nodes = dag_nodes(cfg)
    if nodes:
        from caco.evaluators import registry

        parse_dag(nodes, registry(cfg))
    if cfg.get("tracking") is not None:
        check_settings(cfg.tracking)
        if not local:
            _check_reachable_tracking(cfg.tracking)


def cluster_hosts() -> int | None:
    """How many compute hosts the SLURM cluster has (None when it cannot be asked)."""
    from caco.slurm_accounting import SlurmUnavailable, run_command

    try:
        proc = run_command(["sinfo", "-h", "-N", "-o", "%N"], 10)
    except SlurmUnavailable:
        return None
    return len(set(proc.stdout.split())) if proc.returncode == 0 else None


def _check_reachable_tracking(t) -> None:
    """A loopback tracking server is on the login host only: jobs on other hosts cannot
    reach it (they would buffer forever)."""
    from urllib.parse import urlsplit

    uri = str(t.get("uri") or "")
    if not t.get("enabled", True) or not uri.startswith(("http://", "https://")):
        return
    host = urlsplit(uri).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        return
    hosts = cluster_hosts()
    if hosts is not None and hosts > 1:
        raise ConfigError(
            f"tracking.uri={uri} is a loopback address, which the cluster's {hosts} compute "
            "hosts cannot reach; use the tracking server's address on the cluster network "
            "(e.g. tracking.uri=http://<login host>:<port>)")
