"""Fault injection for the chaos tests, loaded through PYTHONPATH in the processes a test starts
(including SLURM jobs, which inherit the environment). Nothing in the library knows about it.

``CACO_FAULTS`` is a comma-separated list of ``<point>#<n>[@<rank>]``: the fault fires at the
n-th time the point is reached in this process (on that rank only, when given):

- ``ckpt.before_rename``   SIGKILL after last.pt's temporary file is written, before the rename
- ``ckpt.after_rename``    SIGKILL right after last.pt is renamed into place
- ``milestone.before``     SIGKILL after last.pt was written, before epoch_NNNN.pt is published
- ``step.raise``           RuntimeError inside the training step
- ``step.slow``            from the n-th step on, every step sleeps ``CACO_SLOW_STEP_S`` seconds
                           (default 0.5): a run that is surely still training when a test acts
- ``eval.slow``            every evaluation (kNN, linear, detection) first sleeps
                           ``CACO_SLOW_EVAL_S`` seconds (default 60): surely still running when a
                           test acts on it
- ``sched.after_claim``    SIGKILL after the scheduler claimed a node, before submitting it
- ``sched.after_submit``   SIGKILL after a node was submitted, before it is recorded
"""

import importlib.abc
import os
import signal
import sys

SPEC = os.environ.get("CACO_FAULTS", "")
FAULTS = {}
for item in filter(None, SPEC.split(",")):
    point, _, rest = item.partition("#")
    n, _, rank = rest.partition("@")
    FAULTS[point] = (int(n or 1), int(rank) if rank else None)
COUNTS = {}


def _rank():
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", 0)))


def _reach(point):
    """Count one more reaching of ``point`` in this process (on its rank): the count, or 0
    when no fault is set there."""
    if point not in FAULTS or FAULTS[point][1] not in (None, _rank()):
        return 0
    COUNTS[point] = COUNTS.get(point, 0) + 1
    return COUNTS[point]


def fires(point):
    """Whether ``point`` is reached for the n-th time (a one-off fault)."""
    count = _reach(point)
    return count > 0 and count == FAULTS[point][0]


def reached(point):
    """Whether ``point`` has been reached at least n times (a lasting fault)."""
    count = _reach(point)
    return count > 0 and count >= FAULTS[point][0]


def die(point):
    sys.stderr.write(f"CHAOS: SIGKILL at {point}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def patch_fileio(module):
    real = module.os

    class Os:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def replace(src, dst):
            last = str(dst).endswith("/last.pt")
            if last and fires("ckpt.before_rename"):
                die("ckpt.before_rename")
            real.replace(src, dst)
            if last and fires("ckpt.after_rename"):
                die("ckpt.after_rename")

    module.os = Os()


def patch_checkpoint(module):
    publish = module.publish_milestone

    def publish_milestone(last, epoch):
        if fires("milestone.before"):
            die("milestone.before")
        return publish(last, epoch)

    module.publish_milestone = publish_milestone


def patch_step(module):
    step = module.caco_step

    def caco_step(*args, **kwargs):
        if fires("step.raise"):
            raise RuntimeError("CHAOS: injected failure inside the training step")
        if reached("step.slow"):
            import time

            time.sleep(float(os.environ.get("CACO_SLOW_STEP_S", "0.5")))
        return step(*args, **kwargs)

    module.caco_step = caco_step


def patch_ledger(module):
    claim = module.EvalLedger.claim

    def claim_then_maybe_die(self, *args, **kwargs):
        entry = claim(self, *args, **kwargs)
        if entry is not None and fires("sched.after_claim"):
            die("sched.after_claim")
        return entry

    module.EvalLedger.claim = claim_then_maybe_die


def patch_executors(module):
    submit = module.SlurmExecutor.submit

    def submit_then_maybe_die(self, *args, **kwargs):
        job_id = submit(self, *args, **kwargs)
        if fires("sched.after_submit"):
            die("sched.after_submit")
        return job_id

    module.SlurmExecutor.submit = submit_then_maybe_die


def patch_evaluator(module):
    evaluate = module.evaluate

    def slow_evaluate(*args, **kwargs):
        if reached("eval.slow"):
            import time

            time.sleep(float(os.environ.get("CACO_SLOW_EVAL_S", "60")))
        return evaluate(*args, **kwargs)

    module.evaluate = slow_evaluate


PATCHES = {"caco.fileio": patch_fileio, "caco.checkpoint": patch_checkpoint,
           "caco.step": patch_step,
           "caco.dag.ledger": patch_ledger, "caco.dag.executors": patch_executors,
           "evals.knn": patch_evaluator, "evals.linear": patch_evaluator,
           "evals.detection": patch_evaluator}


class _After(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                spec.loader = _After(spec.loader, PATCHES[name])
                return spec
        return None


if FAULTS:
    sys.meta_path.insert(0, _Finder())
