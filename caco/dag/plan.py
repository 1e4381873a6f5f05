"""Which evaluation nodes a checkpoint gets, in dependency order (the ``dag`` config group).

A node declares its evaluator, the checkpoints it runs on (``when: milestones`` = every
milestone checkpoint, ``when: final`` = the last one; ``every: N`` adds every N-th epoch),
what it ``needs`` (other nodes of the same checkpoint), and its own resources. A need on a
node that does not run at this checkpoint is dropped for that checkpoint, so ``report`` can
declare every evaluator and still roll up whatever ran. ``report`` waits with ``afterany``
(it reports failures too); every other dependency is ``afterok``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from caco.errors import ConfigError

REPORT = "report"  # the DAG's own roll-up (caco.dag.report), not an evaluator
WHEN = ("milestones", "final")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    evaluator: str
    when: str = "milestones"
    every: int = 0
    needs: tuple[str, ...] = ()
    resources: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)  # over the run's data config

    @property
    def dependency(self) -> str:
        return "afterany" if self.evaluator == REPORT else "afterok"

    def runs_at(self, epoch: int, final_epoch: int, is_milestone: bool) -> bool:
        if self.when == "milestones" and (is_milestone or epoch == final_epoch):
            return True
        if self.when == "final" and epoch == final_epoch:
            return True
        return bool(self.every) and epoch % self.every == 0


def dag_nodes(cfg: Any) -> dict[str, Any]:
    """The run's DAG nodes: ``dag.nodes``, plus a final kNN node when ``eval.knn.final`` asks
    for one and no kNN node evaluates the final checkpoint (``dag=none`` included)."""
    from caco.config import plain

    dag = cfg.get("dag") or {}
    nodes = plain(dag.get("nodes"))
    knn = (cfg.get("eval") or {}).get("knn")
    if not (knn is not None and knn.get("final")):
        return nodes
    if any(dict(n or {}).get("evaluator", name) == "knn" and dict(n or {}).get("when",
           "milestones") in WHEN for name, n in nodes.items()):
        return nodes  # every kNN node also runs at the final checkpoint
    c = cfg.get("cluster") or {}
    name = "knn" if "knn" not in nodes else "knn_final"
    nodes[name] = {"evaluator": "knn", "when": "final", "resources": {
        "gpus": 1 if int(c.get("gpus_per_node") or 0) else 0,
        "cpus": int(c.get("cpus_per_task") or 1), "mem_gb": min(64, int(c.get("mem_gb") or 4)),
        "timeout_min": 120, "device": str(cfg.get("device", "auto")),
        "threads": int(cfg.get("threads") or 0)}}
    if REPORT in nodes:
        needs = list(nodes[REPORT].get("needs") or [])
        nodes[REPORT]["needs"] = [*needs, name] if name not in needs else needs
    return nodes


def parse_dag(nodes: Mapping[str, Mapping[str, Any]] | None,
              evaluators: Iterable[str] | None = None) -> dict[str, NodeSpec]:
    """Validate ``dag.nodes`` against the evaluator registry (``evaluators``: its names; by
    default today's configs/eval/); errors name the node and the key."""
    if evaluators is None:
        from caco.evaluators import registry, today_config

        evaluators = registry(today_config())
    known = [*sorted(evaluators), REPORT]
    specs: dict[str, NodeSpec] = {}
    for name, raw in (nodes or {}).items():
        raw = dict(raw or {})
        evaluator = raw.get("evaluator", name)
        if evaluator not in known:
            raise ConfigError(f"dag.nodes.{name}.evaluator={evaluator!r}: use one of {known} "
                              "(evaluators are registered by configs/eval/<name>.yaml)")
        if True in raw or "on" in raw:  # YAML reads a bare `on:` key as the boolean true
            raise ConfigError(f"dag.nodes.{name}: use `when:` (milestones or final), not `on:`")
        when = raw.get("when", "milestones")
        if when not in WHEN:
            raise ConfigError(f"dag.nodes.{name}.when={when!r}: use one of {list(WHEN)}")
        every = int(raw.get("every", 0) or 0)
        if every < 0:
            raise ConfigError(f"dag.nodes.{name}.every={every} must be >= 0")
        specs[name] = NodeSpec(name, evaluator, when, every, tuple(raw.get("needs") or ()),
                               dict(raw.get("resources") or {}), dict(raw.get("settings") or {}),
                               dict(raw.get("data") or {}))
    for spec in specs.values():
        for need in spec.needs:
            if need not in specs:
                raise ConfigError(f"dag.nodes.{spec.name}.needs names {need!r}, which is not a "
                                  f"node (nodes: {sorted(specs)})")
    _topological(specs, list(specs))  # raises on a cycle
    return specs


def _topological(specs: Mapping[str, NodeSpec], names: list[str]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ConfigError(f"dag nodes form a cycle: {' -> '.join([*path, name])}")
        state[name] = 1
        for need in specs[name].needs:
            if need in names:
                visit(need, [*path, name])
        state[name] = 2
        order.append(name)

    for name in names:
        visit(name, [])
    return order


def plan_checkpoint(specs: Mapping[str, NodeSpec], epoch: int, final_epoch: int,
                    is_milestone: bool) -> list[NodeSpec]:
    """The nodes of one checkpoint, dependencies first, needs limited to nodes that run."""
    running = [n for n, s in specs.items() if s.runs_at(epoch, final_epoch, is_milestone)]
    plan = []
    for name in _topological(specs, running):
        spec = specs[name]
        needs = tuple(n for n in spec.needs if n in running)
        plan.append(NodeSpec(spec.name, spec.evaluator, spec.when, spec.every, needs,
                             spec.resources, spec.settings, spec.data))
    return plan
