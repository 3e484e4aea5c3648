"""Config: defaults, YAML < CLI precedence, and every validation error's message."""

from __future__ import annotations

import pytest

from s3dist.config import ConfigError, RunConfig, describe, iter_fields, load_config, validate_world


def test_defaults_load_and_every_field_is_documented():
    """The default config validates, and every leaf field carries a docstring (the README table uses it)."""
    cfg = load_config()
    assert cfg.moe.resolved_num_experts() == cfg.moe.granularity * cfg.moe.expansion
    assert cfg.moe.resolved_top_k() == cfg.moe.granularity
    for key, f, _ in iter_fields(cfg):
        assert f.metadata.get("doc"), f"{key} has no doc"
    assert len(describe()) == sum(1 for _ in iter_fields(RunConfig()))


def test_yaml_then_cli_precedence(tmp_path):
    """YAML overrides defaults; a dotted CLI override beats the YAML value; types are parsed."""
    f = tmp_path / "r.yaml"
    f.write_text("moe:\n  num_experts: 6\n  top_k: 3\nstages:\n  specialize_steps: 11\n")
    cfg = load_config(str(f), ["moe.num_experts=12", "stages.run=specialize", "optim.lr=1e-4", "moe.drop_tokens=false"])
    assert cfg.moe.num_experts == 12           # CLI wins
    assert cfg.moe.top_k == 3                  # YAML kept
    assert cfg.stages.specialize_steps == 11   # YAML kept
    assert cfg.stages.run == ["specialize"]
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.moe.drop_tokens is False


@pytest.mark.parametrize("overrides,needle", [
    (["moe.num_expert=4"], "unknown config key 'moe.num_expert'. Did you mean: moe.num_experts"),
    (["bogus.x=1"], "unknown config key 'bogus'"),
    (["moe.num_experts=four"], "config key 'moe.num_experts': expected int, got 'four'"),
    (["optim.lr=0"], "config key 'optim.lr' = 0.0 is out of range; allowed: > 0.0"),
    (["stages.keep_fraction=1.5"], "config key 'stages.keep_fraction' = 1.5 is out of range; allowed: >= 0.0 and <= 1.0"),
    (["moe.kind=sparse"], "config key 'moe.kind' = 'sparse' is not allowed; choose one of ['s3', 'topk', 'dense']"),
    (["dist.zero_stage=3"], "DeepSpeed MoE works with ZeRO stages 0, 1 and 2 only"),
    (["moe.top_k=9", "moe.num_experts=4"], "config key 'moe.top_k' resolves to k=9, more than the 4 experts"),
    (["stages.run=select,specialize"], "must list stages once each, in the order"),
    (["stages.run=pretrain"], "names unknown stage 'pretrain'"),
    (["eval.keep_fractions=0.5,1.2"], "'eval.keep_fractions' holds 1.2; each must be in [0, 1]"),
    (["stages.select_target=concepts"], "'stages.compactness' = 'vmf' needs class labels"),
    (["model.d_model=30", "model.num_heads=4"], "'model.num_heads' = 4 must divide model.d_model = 30"),
    (["eval.probe_Cs=[1.0, -2]"], "'eval.probe_Cs' holds -2; each must be > 0"),
    (["name=../../etc"], "name = '../../etc' is not a safe name"),
    (["moe.kind=dense"], "moe.kind='dense' has no routers"),
    (["moe"], "override 'moe' is not of the form key=value"),
    (["data.modalities=[text, audio, text]"], "'data.modalities' names ['text'] more than once"),
    (["seed=-1"], "'seed' = -1 is out of range; allowed: >= 0 and < 4294967296"),
    (["data.synth.seed=18446744073709551616"], "'data.synth.seed' = 18446744073709551616 is out of range"),
    (["moe.init_seed=-5"], "'moe.init_seed' = -5 is out of range"),
])
def test_validation_messages(overrides, needle):
    """Each invalid input fails before any process group starts, naming key, value and what is allowed."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    """Unknown keys in a recipe name the file and the key; a missing file, a folder and a binary file are named."""
    f = tmp_path / "bad.yaml"
    f.write_text("moe:\n  num_exprts: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'moe.num_exprts'"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"' is a folder; give a YAML recipe"):
        load_config(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=r"model\.safetensors' is not a UTF-8 text file"):
        load_config(str(tmp_path / "model.safetensors"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    # a key given twice (YAML would keep the last silently) and broken YAML: the file, line and column
    (tmp_path / "twice.yaml").write_text("optim:\n  lr: 0.1\n  weight_decay: 0.0\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"(?s)twice\.yaml\", line 2.*key 'lr' is given twice \(first on line 2\).*"
                                          r"twice\.yaml\", line 4, column 3"):
        load_config(str(tmp_path / "twice.yaml"))
    (tmp_path / "broken.yaml").write_text("stages:\n  run: [specialize, select\n")
    with pytest.raises(ConfigError, match=r"(?s)broken\.yaml' is not valid YAML.*broken\.yaml\", line 2, column 8"):
        load_config(str(tmp_path / "broken.yaml"))


def test_world_rules():
    """ep_size must divide the world size and the total number of experts; 0 means the world size;
    concept-supervised Selection needs a data set with concepts."""
    cfg = load_config(None, ["moe.num_experts=3"])
    assert validate_world(cfg, 2, 2) == 2          # 3 experts x 2 modalities = 6, divisible by 2
    with pytest.raises(ConfigError, match="must divide the world size 4"):
        validate_world(load_config(None, ["dist.ep_size=3"]), 4, 2)
    with pytest.raises(ConfigError, match=r"'dist.ep_size' = 0 \(the world size, 2\) must divide the total number of "
                                          r"experts 3 .*on 2 ranks set dist.ep_size to one of \[1\]"):
        validate_world(load_config(None, ["moe.num_experts=3", "moe.shared_experts=true"]), 2, 2)
    with pytest.raises(ConfigError, match=r"'dist.ep_size' = 4 must divide the total number of experts 6 .*one of "
                                          r"\[1, 2\]"):
        validate_world(load_config(None, ["moe.num_experts=3", "dist.ep_size=4"]), 4, 2)
    with pytest.raises(ConfigError, match=r"stages.select_target' = 'concepts' needs a data set with generating"):
        validate_world(load_config(None, ["stages.select_target=concepts", "stages.compactness=entropy"]), 2, 2,
                       has_concepts=False)
    assert validate_world(load_config(None, ["stages.select_target=concepts", "stages.compactness=entropy"]), 2, 2,
                          has_concepts=True) == 2


def test_shipped_recipes_validate():
    """Every run recipe in launch_configs/recipes validates (a shipped file can never be broken)."""
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parents[1].glob("launch_configs/recipes/*.yaml"))
    assert len(recipes) >= 7
    for r in recipes:
        load_config(str(r))


def test_train_arguments_in_any_order():
    """Options and dotted overrides may be interleaved (SLURM scripts append options after user overrides)."""
    from s3dist.train import parse_args

    _, cfg = parse_args(["moe.num_experts=8", "--output_dir", "/tmp/x", "stages.select_steps=3", "--overwrite"])
    assert (cfg.moe.num_experts, cfg.output_dir, cfg.stages.select_steps, cfg.overwrite) == (8, "/tmp/x", 3, True)


def test_deepspeed_accelerator_must_match_torch_device():
    """A DeepSpeed accelerator that disagrees with torch's device (DS_ACCELERATOR=cpu on a GPU node,
    the bug `s3dist bench train` had) is refused before the engine quietly keeps the model elsewhere.
    Run in a fresh interpreter: DeepSpeed's accelerator is process-global."""
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "from deepspeed.accelerator import set_accelerator\n"
        "from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator\n"
        "from s3dist.config import ConfigError, DistConfig\n"
        "from s3dist.dist import init_distributed\n"
        "assert not torch.cuda.is_available()\n"
        "set_accelerator(CUDA_Accelerator())\n"
        "try:\n"
        "    init_distributed(DistConfig())\n"
        "except ConfigError as e:\n"
        "    print('REFUSED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED" in out.stdout and "'cuda'" in out.stdout and "DS_ACCELERATOR" in out.stdout, out.stdout


def test_a_list_key_written_as_one_item_in_a_recipe_is_that_item(tmp_path):
    """`run: specialize` in a YAML recipe means [specialize], as stages.run=specialize does on the command line."""
    from s3dist.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  run: specialize\neval:\n  keep_fractions: 0.3\n  probe_Cs: 1.0,10\n")
    cfg = load_config(str(recipe), [])
    assert cfg.stages.run == ["specialize"] and cfg.eval.keep_fractions == [0.3] and cfg.eval.probe_Cs == [1.0, 10]
    assert load_config(None, ["stages.run=specialize"]).stages.run == ["specialize"]


def test_a_run_records_its_local_data_path_absolute_with_home_expanded(tmp_path, monkeypatch):
    """data.path as a user types it (relative, `~/...`) is recorded as the absolute path it names, so eval /
    export / embed find the data from any directory; URLs and '' stay as given."""
    import os

    from s3dist.config import absolute_local_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert absolute_local_path("~/data/mosi") == str(tmp_path / "home" / "data" / "mosi")
    assert absolute_local_path("data/mosi") == str(tmp_path / "data" / "mosi")
    assert absolute_local_path("/abs/mosi") == "/abs/mosi" and os.path.isabs(absolute_local_path("./x"))
    for url in ("s3://bucket/mosi", "memory://mosi", ""):
        assert absolute_local_path(url) == url
