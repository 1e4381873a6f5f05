"""Planning a checkpoint's evaluation DAG from the ``dag`` config."""

from __future__ import annotations

import pytest
from helpers import compose_pretrain

from caco.dag.plan import parse_dag, plan_checkpoint
from caco.errors import ConfigError


def _default():
    return parse_dag(compose_pretrain("dag=default").dag.nodes)


def test_milestone_gets_knn_then_report():
    plan = plan_checkpoint(_default(), epoch=20, final_epoch=200, is_milestone=True)
    assert [(n.name, n.needs, n.dependency) for n in plan] == [
        ("knn", (), "afterok"), ("report", ("knn",), "afterany")]


def test_final_checkpoint_gets_everything_dependencies_first():
    plan = plan_checkpoint(_default(), epoch=200, final_epoch=200, is_milestone=True)
    names = [n.name for n in plan]
    assert names[-1] == "report" and set(names) == {"knn", "linear", "detection", "report"}
    assert plan[-1].needs == ("knn", "linear", "detection")
    assert plan_checkpoint(_default(), epoch=7, final_epoch=200, is_milestone=False) == []


def test_every_n_epochs():
    specs = parse_dag({"linear": {"evaluator": "linear", "when": "final", "every": 50}})
    assert [n.name for n in plan_checkpoint(specs, 100, 200, False)] == ["linear"]
    assert plan_checkpoint(specs, 120, 200, True) == []


@pytest.mark.parametrize(("nodes", "match"), [
    ({"x": {"evaluator": "segmentation"}}, r"dag\.nodes\.x\.evaluator='segmentation'"),
    ({"knn": {"needs": ["linear"]}}, r"dag\.nodes\.knn\.needs names 'linear'"),
    ({"knn": {"when": "sometimes"}}, r"dag\.nodes\.knn\.when='sometimes'"),
    ({"knn": {True: "final"}}, r"use `when:`"),
    ({"knn": {"needs": ["report"]}, "report": {"needs": ["knn"]}}, "cycle: knn -> report -> knn"),
])
def test_bad_dag_configs_name_the_node(nodes, match):
    with pytest.raises(ConfigError, match=match):
        parse_dag(nodes)
