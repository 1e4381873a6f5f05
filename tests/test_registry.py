"""The evaluator registry is data: every configs/eval/<name>.yaml gives the DAG what it needs,
Hydra composes every option with every DAG, a new evaluator is one module plus one config, and
the library never imports the evaluators."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest
from helpers import CONFIGS, ROOT, compose_pretrain
from hydra import compose, initialize_config_dir

from caco.dag.plan import dag_nodes, parse_dag, plan_checkpoint
from caco.dag.scheduler import DagScheduler
from caco.evaluators import load, registry

DAGS = sorted(p.stem for p in (CONFIGS / "dag").glob("*.yaml"))
EVALUATORS = sorted(p.stem for p in (CONFIGS / "eval").glob("*.yaml"))


def test_every_registered_evaluator_has_what_the_dag_needs():
    found = registry(compose_pretrain())
    assert sorted(found) == EVALUATORS
    for name, ev in found.items():
        module = load(ev)  # importable, with evaluate(checkpoint, cfg)
        assert module.__name__ == ev.module
        assert ev.headline and all(isinstance(m, str) and m for m in ev.headline), name
        assert "module" not in ev.settings and "headline" not in ev.settings


@pytest.mark.parametrize("dag", DAGS)
@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_every_dag_composes_with_every_evaluator(tmp_path, dag, evaluator):
    cfg = compose_pretrain(f"dag={dag}", "experiment=smoke", f"output_root={tmp_path}",
                           f"+dag.nodes.extra={{evaluator: {evaluator}, when: final}}")
    specs = parse_dag(dag_nodes(cfg), registry(cfg))
    final = plan_checkpoint(specs, cfg.epochs, cfg.epochs, is_milestone=True)
    assert "extra" in [s.name for s in final]
    job = DagScheduler(cfg, tmp_path / "run", executor=object())._job(
        specs["extra"], "ckpt.pt", cfg.epochs, "key")
    assert job.module == f"evals.{evaluator}" and job.headline
    assert job.settings == {k: v for k, v in job.settings.items()
                            if k not in ("module", "headline")}


def test_a_new_evaluator_is_one_module_and_one_config(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "eval" / "toy.yaml").write_text(
        "toy:\n  module: toy_evaluator\n  headline: [toy_score]\n  scale: 2\n")
    (tmp_path / "toy_evaluator.py").write_text(
        "def evaluate(checkpoint, cfg):\n    return {'toy_score': cfg.eval.toy.scale * 1.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("pretrain", overrides=["eval=[knn,linear,detection,toy]",
                                             "+dag.nodes.toy={evaluator: toy, when: final}"])
    toy = registry(cfg)["toy"]
    assert toy.headline == ("toy_score",) and toy.settings == {"scale": 2}
    assert load(toy).evaluate("x", compose_cfg(toy)) == {"toy_score": 2.0}
    assert "toy" in parse_dag(dag_nodes(cfg), registry(cfg))
    sys.modules.pop("toy_evaluator", None)


def compose_cfg(ev):
    from omegaconf import OmegaConf

    return OmegaConf.create({"eval": {ev.name: ev.settings}})


def test_the_library_never_imports_the_evaluators():
    for path in (ROOT / "caco").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "evals" for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "evals", path
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    node.value.startswith("evals."):
                pytest.fail(f"{path}: an evaluator module path in the library: {node.value}")


def test_no_code_reads_the_project_configs_by_path():
    """Hydra composes configs/; the one place that names the folder is caco.config (what Hydra
    is pointed at). A run's own config.yaml may be read: it is that run's record."""
    for path in [*Path(ROOT / "caco").rglob("*.py"), *Path(ROOT / "evals").rglob("*.py")]:
        text = path.read_text()
        if path.name != "config.py":
            assert '"configs"' not in text and "parents[2]" not in text, path
