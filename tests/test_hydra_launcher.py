"""``hydra/launcher=caco_slurm`` is a proper Hydra launcher: Hydra's own launcher test suites on
the real SLURM cluster (parametrized the way the stock submitit plugin's tests are), and its
non-blocking returns through Hydra's basic sweeper. Required in CI: a missing cluster FAILS."""

from __future__ import annotations

import pytest
from hydra.core.utils import JobStatus
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from slurm_utils import require_cluster, wait_for_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# What the one-node test cluster can give each job; wait=true blocks like the stock launcher.
RESOURCES = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5"]


@pytest.fixture(autouse=True)
def _cluster():
    require_cluster()


@pytest.fixture(autouse=True)
def _fresh_version_base():
    """Hydra's version base is process-global: other modules compose with 1.3 (jobs keep the
    launching directory), Hydra's suites expect a fresh process's default."""
    from hydra import version

    base = version.VersionBase.instance()
    saved, base.version_base = base.version_base, version._UNSPECIFIED_
    yield
    base.version_base = saved


@pytest.mark.parametrize(("launcher_name", "overrides"),
                         [("caco_slurm", ["hydra.launcher.wait=true", *RESOURCES])])
class TestCacoSlurmLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize(("task_launcher_cfg", "extra_flags"), [
    ({}, ["-m", "hydra/launcher=caco_slurm", "hydra.launcher.wait=true", *RESOURCES])])
class TestCacoSlurmLauncherIntegration(IntegrationTestSuite):
    pass


@pytest.mark.usefixtures("hydra_restore_singletons")
@pytest.mark.parametrize("batch", [None, 1])
def test_non_blocking_returns_say_submitted_not_finished(hydra_sweep_runner, tmpdir, batch):
    """Without wait the launcher returns at once; the returns neither claim COMPLETED nor
    raise when the basic sweeper reads them (in one batch, or one batch per point)."""
    overrides = ["hydra/launcher=caco_slurm", *RESOURCES, "+a=0,1"]
    if batch:
        overrides.append(f"hydra.sweeper.max_batch_size={batch}")
    sweep = hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module",
                               task_function=lambda cfg: cfg.a, config_path="configs",
                               config_name="compose", overrides=overrides, temp_dir=tmpdir)
    with sweep:  # (the runner deletes its folder on exit: the jobs must end inside)
        returns = [r for batch_returns in sweep.returns for r in batch_returns]
        assert len(sweep.returns) == (2 if batch else 1)
        assert [r.overrides for r in returns] == [["+a=0"], ["+a=1"]]
        for r in returns:
            assert r.status == JobStatus.UNKNOWN  # not COMPLETED: it has not run yet
            assert r.return_value.state == "SUBMITTED"
            assert r.return_value.job_id
        ids = [r.return_value.job_id for r in returns]
        assert len(set(ids)) == 2
        assert set(wait_for_jobs(ids, 120).values()) == {"COMPLETED"}
