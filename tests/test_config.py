"""conf/ composes into the committed params.yaml; group switches and values compose."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from stages.common.compose import compose


def composed(tmp_path: Path, overrides: list[str] | None = None) -> dict:
    out = tmp_path / "params.yaml"
    compose(out, overrides)
    return yaml.safe_load(out.read_text())


def test_committed_params_equal_composed_conf(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert composed(tmp_path) == committed, "params.yaml drifted from conf/: run `make params`"


def test_interface_keys_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = composed(tmp_path)
    for dotted in ["model.name_or_path", "data.path", "data.kind", "train.learning_rate",
                   "train.max_steps", "train.gradient_accumulation_steps", "seed", "method.name"]:
        node = params
        for key in dotted.split("."):
            assert key in node, f"{dotted} missing from params"
            node = node[key]
    assert params["method"]["name"] == "lora"


def test_group_switch_and_value_override(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = composed(tmp_path, ["method=full", "train.max_steps=7"])
    assert params["method"] == {"name": "full"}
    assert params["train"]["max_steps"] == 7
    # the full method lowers the LoRA-sized learning rate; a command-line value still wins
    assert params["train"]["learning_rate"] < 1e-4
    assert composed(tmp_path, ["method=full", "train.learning_rate=3e-4"])["train"][
        "learning_rate"] == 3e-4


def test_dvc_hydra_composition_is_enabled():
    config = (ROOT / ".dvc/config").read_text()
    assert "[hydra]" in config and "enabled = True" in config


def test_no_hydra_runtime_interpolations():
    # DVC composes without Hydra's runtime config: ${hydra:...} would fail there
    for path in (ROOT / "conf").rglob("*.yaml"):
        assert "${hydra:" not in path.read_text(), path


def test_stage_deps_list_every_shared_module_the_stage_imports():
    """dvc.yaml names shared modules one by one (so data code changes do not retrain); an
    import missing from a stage's deps would let DVC skip a stage whose code changed."""
    import ast

    def imported(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages.common"):
                if node.module == "stages.common":
                    found |= {f"stages/common/{a.name}.py" for a in node.names}
                else:
                    found.add(node.module.replace(".", "/") + ".py")
        return found

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        needed, todo = set(), [ROOT / f"stages/{name}.py"]
        while todo:
            for module in imported(todo.pop()) - needed:
                needed.add(module)
                todo.append(ROOT / module)
        missing = needed - set(stage["deps"])
        assert not missing, f"stage {name}: add {sorted(missing)} to its deps in dvc.yaml"


PRESETS = ["cpu_demo", "smoke", "gpu_1b", "gpu_8b_qlora"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_and_name_themselves(tmp_path, monkeypatch, preset):
    monkeypatch.chdir(ROOT)
    params = composed(tmp_path, [f"+experiment={preset}"])
    assert params["preset"] == preset
    # a preset changes values, never the shape of the config the stages read
    assert set(params) == set(composed(tmp_path))


def test_cpu_demo_preset_is_what_dvc_repro_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    demo, default = composed(tmp_path, ["+experiment=cpu_demo"]), composed(tmp_path)
    assert {**demo, "preset": None} == default


def test_gpu_presets_leave_the_demo_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    one_b = composed(tmp_path, ["+experiment=gpu_1b"])
    assert one_b["model"]["name_or_path"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert one_b["model"]["allow_download"] and one_b["method"]["name"] == "lora"
    assert one_b["train"]["max_steps"] == -1 and one_b["train"]["num_train_epochs"] >= 1
    assert one_b["train"]["max_length"] == "auto"  # from the data
    assert one_b["eval"]["max_new_tokens"] == "auto"
    eight_b = composed(tmp_path, ["+experiment=gpu_8b_qlora"])
    assert eight_b["model"]["name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert eight_b["method"]["name"] == "qlora" and eight_b["train"]["gradient_checkpointing"]
    # a value on the command line still wins over the preset
    assert composed(tmp_path, ["+experiment=gpu_1b", "train.learning_rate=1e-5"])["train"][
        "learning_rate"] == 1e-5
