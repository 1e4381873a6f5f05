"""What SLURM says when it refuses a submission, and what to do about it.

``sbatch`` fails for two kinds of reasons. Transient ones (the controller is busy, restarting or
briefly unreachable) go away by themselves: :func:`submit_with_retry` retries them with
backoff for about two minutes. Everything else is permanent (an unknown partition, GPUs the
cluster does not have, an account or QOS limit): retrying cannot help, so the error is raised
at once as :class:`SubmissionRefused`, with SLURM's own words and the config key to change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from caco.errors import CacoError

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT = ("socket timed out", "unable to contact slurm controller",
             "resource temporarily unavailable", "temporarily unable to accept job",
             "slurm temporarily unable", "zero bytes were transmitted or received",
             "connection refused", "slurmctld is not responding")

# Words of SLURM's refusal -> the resource it is about (the caller names the config key).
_RESOURCE_OF = (
    ("gres", "gpus"), ("generic resource", "gpus"),
    ("account", "account"),  # before partition: "Invalid account or account/partition ..."
    ("partition", "partition"),
    ("qos", "qos"),
    ("memory", "mem"),
    ("time limit", "time"),
    ("node count", "nodes"),
    ("feature specification", "constraint"),
    ("node name", "nodelist"),
    ("more processors requested", "cpus"),
    ("node configuration is not available", "shape"),
    ("accounting/qos policy", "limits"), ("maxsubmit", "limits"), ("job limit", "limits"),
)

BACKOFF_S = (1, 2, 4, 8, 15, 30, 60)  # about two minutes in all


class SubmissionRefused(CacoError, RuntimeError):
    """SLURM refused a submission for good (or stayed unreachable through every retry)."""

    def __init__(self, message: str, slurm_words: str, transient: bool = False) -> None:
        super().__init__(message)
        self.slurm_words = slurm_words
        self.transient = transient


def slurm_words(error: BaseException | str) -> str:
    """SLURM's own lines of an sbatch failure (without our wrapping)."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines
    return " / ".join(dict.fromkeys(errors))[:600] or type(error).__name__


def is_transient(error: BaseException | str) -> bool:
    text = str(error).lower()
    return any(t in text for t in TRANSIENT)


def resource_of(words: str) -> str | None:
    low = words.lower()
    for needle, resource in _RESOURCE_OF:
        if needle in low:
            return resource
    return None


def explain(words: str, keys: Mapping[str, str], what: str = "the submission") -> str:
    """One message: SLURM's words, then the config key that decides it."""
    resource = resource_of(words)
    if is_transient(words):
        hint = ("the SLURM controller did not answer: is it up? (`sinfo`, `scontrol ping`); "
                "submit again once it answers")
    elif resource in keys:
        hint = f"change {keys[resource]}"
    elif resource == "shape":
        shape = [keys[k] for k in ("nodes", "tasks", "cpus", "mem", "gpus") if k in keys]
        hint = ("no node has what was asked for; lower " + ", ".join(shape)) if shape else \
            "no node has what was asked for"
    elif resource == "limits":
        hint = "a limit of your account or QOS was hit; submit fewer jobs or ask your admins"
    else:
        hint = "check the job's resources"
    return f"SLURM refused {what}: {words}; {hint}"


def submit_with_retry(submit: Callable[[], T], *, keys: Mapping[str, str],
                      what: str = "the submission",
                      backoff: tuple[float, ...] = BACKOFF_S,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``submit``; retry transient SLURM errors with backoff, refuse the rest at once.

    ``submit`` raises whatever the submitting library raises (submitit's ``FailedJobError``
    carries sbatch's stderr); any error whose words are not transient is permanent.
    """
    for attempt, pause in enumerate((*backoff, None)):
        try:
            return submit()
        except (RuntimeError, OSError) as e:  # submitit's errors are RuntimeErrors
            if isinstance(e, SubmissionRefused):
                raise
            words = slurm_words(e)
            if not is_transient(words):
                raise SubmissionRefused(explain(words, keys, what), words) from None
            if pause is None:
                raise SubmissionRefused(explain(words, keys, what) + (
                    f" (still failing after {attempt + 1} attempts)"), words,
                    transient=True) from None
            log.warning("%s: transient SLURM error (%s); retrying in %g s", what, words, pause)
            sleep(pause)
    raise AssertionError("unreachable")
