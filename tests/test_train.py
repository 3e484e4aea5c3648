"""End-to-end training: 2 real gloo ranks with ep_size=2, and the `accelerate launch` entry point."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.multirank import run_ranks

from tests.launching import TINY


def _train(rank, world, out_dir, overrides):
    from s3dist.config import load_config
    from s3dist.train import run

    cfg = load_config(None, overrides + [f"output_dir={out_dir / 'run'}"])
    trainer = run(cfg)
    model = trainer.model
    # experts under DeepSpeed's per-expert names (the state dict's; the parameters are stacked per layer)
    expert = {n: p.clone() for n, p in model.state_dict().items() if ".deepspeed_experts." in n}
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if getattr(p, "allreduce", True)}
    return {"expert": expert, "dense": dense, "ep_rank": trainer.dims.ep_rank}


@pytest.mark.slow
def test_two_rank_expert_parallel_training(tmp_path):
    """ep_size=2 on 2 ranks: loss decreases, each rank holds only its experts, dense params stay identical."""
    over = TINY + ["stages.specialize_steps=40", "stages.select_steps=10", "dist.ep_size=2"]
    res = run_ranks(_train, 2, tmp_path, over)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    s1 = [r["loss"] for r in rows if r["stage"] == "specialize"]
    assert len(s1) == 8 and s1[-1] < s1[0] - 0.05, s1
    # Expert ownership: disjoint halves of the 2 modalities x 4 experts = 8 experts.
    n_experts = [len({n.split("deepspeed_experts.")[1].split(".")[0] for n in r["expert"]}) for r in res]
    assert n_experts == [4, 4]
    assert all(not torch.equal(res[0]["expert"][n], res[1]["expert"][n]) for n in res[0]["expert"])
    assert res[0]["dense"].keys() == res[1]["dense"].keys()
    for n, p in res[0]["dense"].items():
        assert torch.equal(p, res[1]["dense"][n]), f"dense param {n} differs across ranks"
    shared = sum(p.numel() for p in res[0]["dense"].values())
    per_rank_expert = sum(p.numel() for p in res[0]["expert"].values())
    assert per_rank_expert == sum(p.numel() for p in res[1]["expert"].values())
    assert shared > 0 and per_rank_expert > 0


@pytest.mark.slow
def test_accelerate_launch_run_directory_contract(reference_run):
    """`accelerate launch --config_file launch_configs/cpu_2proc.yaml -m s3dist.train` (the session's
    `reference_run`, tests/conftest.py) leaves the documented run directory: config.yaml, metrics.jsonl, tb/,
    checkpoints/, eval.json."""
    out = reference_run
    stderr = (out.parent / "launch.stderr").read_text()
    noisy = [ln for ln in stderr.splitlines() if "FutureWarning" in ln or "DeprecationWarning" in ln]
    assert not noisy, noisy  # a default run uses current APIs: users should not learn to ignore warnings
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["stages"]["specialize_steps"] == 40 and cfg["data"]["modalities"] == ["text", "audio"]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # a time series of training steps only: evaluation results live in eval.json and TensorBoard
    assert rows and all({"step", "stage", "loss", "samples_per_s"} <= r.keys() for r in rows)
    assert {r["stage"] for r in rows} == {"specialize", "select"}
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").exists()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert list((out / "checkpoints" / latest).glob("layer_*_expert_*_model_states.pt"))
    ev = json.loads((out / "eval.json").read_text())
    assert {"probe_accuracy", "sweep", "best_keep_fraction", "best_accuracy", "modalities", "stage3",
            "eval_dropped_fraction"} <= ev.keys()
    assert ev["eval_dropped_fraction"] == 0.0
    assert {r["keep_fraction"] for r in ev["sweep"]} == {0.3, 1.0}
    ranks = [json.loads(ln) for ln in (out / "ranks.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1]

