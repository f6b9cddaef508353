"""conf/ composes into the committed params.yaml; group switches and values compose."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from stages.common import schema
from stages.common.compose import compose
from stages.common.schema import check


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
    for dotted in [
        "model.name_or_path",
        "data.path",
        "data.kind",
        "train.learning_rate",
        "train.max_steps",
        "train.gradient_accumulation_steps",
        "seed",
        "method.name",
    ]:
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
    assert (
        composed(tmp_path, ["method=full", "train.learning_rate=3e-4"])["train"]["learning_rate"]
        == 3e-4
    )


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
    assert eight_b["method"]["name"] == "qlora" and eight_b["train"]["activation_checkpointing"]
    # a value on the command line still wins over the preset
    assert (
        composed(tmp_path, ["+experiment=gpu_1b", "train.learning_rate=1e-5"])["train"][
            "learning_rate"
        ]
        == 1e-5
    )


# --- the typed schema (stages/common/schema.py) ---------------------------------------------

GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in (ROOT / "conf").iterdir()
    if group.is_dir() and group.name not in ("accelerate", "experiment")
}


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g, opts in GROUPS.items() for o in opts]
    + [f"+experiment={p}" for p in PRESETS]
    + [f"method={m} objective={o}" for m in GROUPS["method"] for o in GROUPS["objective"]],
)
def test_every_config_the_groups_compose_passes_the_schema(tmp_path, monkeypatch, override):
    monkeypatch.chdir(ROOT)
    params = composed(tmp_path, override.split())
    assert check(params) == params  # and checking changes nothing in a composed config


def _with(params: dict, dotted: str, value) -> dict:
    params = copy.deepcopy(params)
    *keys, last = dotted.split(".")
    node = params
    for key in keys:
        node = node[key]
    if value is MISSING:
        del node[last]
    else:
        node[last] = value
    return params


MISSING = object()
# (key, wrong value, what the one-line message must say): at least one per section
REFUSED = [
    ("model.allow_download", "maybe", "valid boolean"),
    ("model.name_or_path", "", "at least 1 character"),
    ("data.kind", "chat", "'messages'"),
    ("data.max_rejected_fraction", 1.5, "less than or equal to 1"),
    ("data.length_policy", "cut", "'truncate'"),
    ("data.schema_drift", "ignore", "'warn' or 'fail'"),
    ("task.answer_regex", "(?P<x", "does not compile"),
    ("task.labels", {"colour": ["red"]}, "name no group"),
    ("task.metrics", ["accuracy"], "no module in stages/metrics"),
    ("dedup.threshold", 0, "greater than 0"),
    ("dedup.conflict_policy", "keep_all", "'drop_all'"),
    ("split.train", 0.9, "not 1"),
    ("split.leakage.policy", "drop", "'report' or 'remove'"),
    ("split.rebalance", "oversample", "'upsample'"),
    ("train.precision", "bf61", "'bf16'"),
    ("train.learning_rate", -0.001, "greater than 0"),
    ("train.learning_rate", "fast", "valid number"),
    ("train.warmup_steps", -0.5, "greater than or equal to 0"),
    ("train.lr_scheduler_type", "cosine_annealing", "'cosine'"),
    ("train.max_steps", 0, "-1 for whole epochs"),
    ("train.max_length", 0, "greater than 0, or 'auto'"),
    ("train.per_device_train_batch_size", 2.5, "valid integer"),
    ("train.attn_implementation", "flash", "'flash_attention_2'"),
    ("train.lerning_rate", 0.1, "unknown key (did you mean learning_rate?)"),
    ("train.eval_steps", MISSING, "missing"),
    ("method.r", 0, "method.r=0"),
    ("method.name", "adalora", "use one of 'lora'"),
    ("method.alpha", -1, "greater than 0"),
    ("objective.train_on", "al", "'assistant' or 'all'"),
    ("objective.name", "ppo", "use one of 'sft'"),
    ("launch.name", "horovod", "'deepspeed'"),
    ("launch.num_processes", 0, "greater than 0"),
    ("export.check_examples", -1, "greater than or equal to 0"),
    ("eval.max_new_tokens", "lots", "or 'auto'"),
    ("eval.batch_size", 0, "greater than 0"),
    ("serve.port", 70000, "less than or equal to 65535"),
    ("regression.confidence", 1.0, "less than 1"),
    ("regression.tolerance", {"test_loss": 0.1}, "`default` entry"),
    ("tracking.mode", "cloud", "'offline'"),
    ("seed", -1, "greater than or equal to 0"),
    ("colour", "blue", "colour: unknown key"),
]


@pytest.mark.parametrize("dotted,value,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_schema_refuses_a_wrong_value_in_one_line_naming_key_and_value(dotted, value, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with pytest.raises(ValueError) as err:
        check(_with(params, dotted, value))
    text = str(err.value)
    assert "\n" not in text and message in text, text
    assert dotted.split(".")[-1] in text or dotted.split(".")[0] in text, text


def test_a_yaml_string_number_reads_as_the_number():
    # PyYAML (YAML 1.1) reads `1e-4` as a string; the schema turns it into the number it means
    params = _with(
        yaml.safe_load((ROOT / "params.yaml").read_text()), "train.learning_rate", "1e-4"
    )
    assert check(params)["train"]["learning_rate"] == 1e-4


def test_schema_enums_match_the_libraries_they_name():
    """The allowed values copy two libraries' lists; this fails loudly when they change."""
    from typing import get_args

    from transformers.trainer_utils import SchedulerType

    assert set(get_args(schema.Scheduler)) == {s.value for s in SchedulerType}
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(get_args(schema.DpoLoss)) == set(re.findall(r"`'(\w+)'`", help_text))


def test_a_stage_refuses_bad_params_before_any_work(tmp_path, monkeypatch):
    params = _with(yaml.safe_load((ROOT / "params.yaml").read_text()), "train.precision", "bf61")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "stages.train"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: params.yaml: train.precision='bf61': Input should be "
        "'auto', 'fp32', 'bf16' or 'fp16'"
    )
    assert not (tmp_path / "models").exists() and not (tmp_path / "wandb").exists()


def test_a_stage_under_another_interpreter_says_so_in_one_line(tmp_path):
    """`.venv/bin/dvc exp run` without the venv activated runs `python -m stages.X` with
    whatever python is first on PATH; an empty virtualenv stands in for it."""
    subprocess.run(
        [sys._base_executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True
    )
    out = subprocess.run(
        [str(tmp_path / "env/bin/python"), "-m", "stages.train"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "lacks torch" in out.stderr, out.stderr
    assert "source .venv/bin/activate" in out.stderr


# --- lineage: every file a param names is a dependency of the stage that reads it -----------

# param -> (the stage that reads the file, the shipped value or an example of one)
PARAM_FILES = {
    "data.path": ("validate", "data/raw/tickets.jsonl"),
    "data.test_path": ("validate", "data/eval/tickets_test.jsonl"),
    "split.leakage.external_eval": ("split", "data/eval/tickets_test.jsonl"),
    "eval.general_path": ("evaluate", "data/general/instructions.jsonl"),
    "model.training_chat_template": ("base_model", "conf/chat_templates/README.md"),
    "launch.config_file": ("train", "conf/accelerate/ddp.yaml"),
}


@pytest.mark.parametrize("key", PARAM_FILES)
def test_files_params_name_are_dependencies_of_their_stage(key, monkeypatch):
    from stages.common.config import StageError, require_dependency

    monkeypatch.chdir(ROOT)
    stage, example = PARAM_FILES[key]
    assert (ROOT / example).exists()
    assert require_dependency(stage, key, example) == Path(example)
    with pytest.raises(
        StageError,
        match=rf"{re.escape(key)}=/tmp/elsewhere.jsonl: not a "
        rf"dependency of the {stage} stage",
    ):
        require_dependency(stage, key, "/tmp/elsewhere.jsonl")


def test_every_path_the_stages_share_is_declared_in_dvc_yaml():
    """stages/common/paths.py names each path once; dvc.yaml must declare the same path (or
    the folder holding it) as a dep or out, or DVC would not track what the stages pass on."""
    from stages.common import paths

    declared = set()
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("deps", []) + stage.get("outs", []) + stage.get("metrics", []):
            declared.add(Path(next(iter(entry)) if isinstance(entry, dict) else entry))
    named = {name: value for name, value in vars(paths).items() if isinstance(value, Path)}
    assert len(named) > 20
    for name, path in named.items():
        inside = path in declared or any(d in path.parents for d in declared)
        holds = any(path in d.parents for d in declared)  # a folder of declared outputs
        assert inside or holds, f"paths.{name} = {path} is in no stage's deps or outs"
    for stage in ("base_model", "validate", "dedup", "split", "train", "export"):
        assert paths.stage_report(stage) in declared
