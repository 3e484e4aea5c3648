"""Never lose a run: exact resume after SIGKILL, pre-emption, resharding, export, clear failures.

All runs are real 2-process `accelerate launch` jobs on CPU/gloo unless a test says otherwise. Every resume
is compared against the session's uninterrupted run of the same command (`reference_run`, tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import launching
from tests.launching import REFERENCE, ROOT, TINY
from tests.multirank import run_main, run_ranks

pytestmark = pytest.mark.slow

RUN = REFERENCE + ["eval.run_at_end=false"]  # 40 + 20 steps, a checkpoint every 10, ep=2


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from s3dist.checkpoint import consolidated_state_dict, find_latest

    return consolidated_state_dict(find_latest(run_dir))


def _kill_when(proc: subprocess.Popen, out: Path, predicate, timeout: float = 300) -> str:
    """SIGKILL the whole job as soon as `latest` names a checkpoint satisfying `predicate`."""
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest.exists():
            tag = latest.read_text().strip()
            if predicate(tag):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return tag
        if proc.poll() is not None:
            pytest.fail(f"job ended before the kill point:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("no checkpoint appeared in time")


def _assert_same_run(out: Path, reference: Path, after_step: int) -> None:
    ref_w, got_w = _final_weights(reference), _final_weights(out)
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], atol=1e-6, rtol=0, msg=lambda s: f"{k}: {s}")
    ref_l, got_l = _losses(reference), _losses(out)
    assert ref_l.keys() == got_l.keys()
    for step in ref_l:
        if step > after_step:
            assert abs(got_l[step] - ref_l[step]) <= 1e-6, (step, got_l[step], ref_l[step])


@pytest.mark.parametrize("where", ["mid_stage1", "stage_boundary"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, reference_run, where):
    """SIGKILL mid-Stage-1 (or right after the Stage-1 checkpoint), then --resume auto: the final
    parameters and every logged loss after the resume point equal the uninterrupted run's."""
    out = tmp_path / "run"
    proc = launching.start(out, RUN)
    if where == "mid_stage1":
        tag = _kill_when(proc, out, lambda t: t.endswith("specialize"))
    else:
        tag = _kill_when(proc, out, lambda t: int(t.split("-")[1]) >= 40)
    step = int(tag.split("-")[1])
    assert step < 60, "the job finished before it was killed: nothing was tested"
    p = launching.run_forked(out, RUN, extra=["--resume", "auto"])  # what resumes is the run, not the launcher
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _assert_same_run(out, reference_run, step)


def test_preemption_signal_checkpoints_exits_75_and_resumes(tmp_path, reference_run):
    """SIGUSR2 (what SLURM sends before pre-empting) to a running 2-rank job: every rank finishes its
    step, a checkpoint is written, the job exits 75; --resume auto then finishes like the reference."""
    out = tmp_path / "run"
    proc = launching.start(out, RUN, launcher="s3dist.launch")
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, log[-3000:]
    tag = latest.read_text().strip()
    step = int(tag.split("-")[1])
    assert 10 <= step < 60
    p = launching.run_forked(out, RUN, extra=["--resume", "auto"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _assert_same_run(out, reference_run, step)


# ---------------------------------------------------------------------------------------------
# Resharding: a checkpoint written by ep=2 on 2 ranks, loaded by DeepSpeed on 1 rank with ep=1
# ---------------------------------------------------------------------------------------------


def _outputs_from_checkpoint(rank, world, out_dir, ckpt, ep):
    from s3dist.checkpoint import read_meta
    from s3dist.config import from_dict
    from s3dist.dist import build_engine, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder

    cfg = from_dict(read_meta(Path(ckpt))["config"])
    cfg.moe.drop_tokens = False  # capacity is not a weight: compare routing without drops
    dims = make_dims(*init_distributed(cfg.dist), ep)
    mods = {"text": 12, "audio": 8}
    torch.manual_seed(123)  # a different init than training: everything must come from the checkpoint
    model = S3Encoder(mods, cfg.model, cfg.moe, ep_size=ep, ep_rank=dims.ep_rank)
    engine = build_engine(model, list(model.parameters()), lr=1e-3, total_steps=1, optim=cfg.optim,
                          dist_cfg=cfg.dist, micro_batch=4)
    engine.load_checkpoint(str(Path(ckpt).parent), tag=Path(ckpt).name, load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)
    g = torch.Generator().manual_seed(5)
    feats = {m: torch.randn(8, 8, d, generator=g) for m, d in mods.items()}
    masks = {m: torch.ones(8, 8, dtype=torch.bool) for m in mods}
    per = 8 // world
    sl = slice(rank * per, (rank + 1) * per)
    model.eval()
    with torch.no_grad():
        out = model({m: f[sl] for m, f in feats.items()}, {m: k[sl] for m, k in masks.items()})
    return {m: e for m, e in out.embeddings.items()}


def test_reshard_ep2_checkpoint_to_ep1(tmp_path, reference_run):
    """Weights written with ep_size=2 on 2 ranks load on 1 rank with ep_size=1 (DeepSpeed maps expert
    files by global index); outputs on the same inputs are equal before and after."""
    from s3dist.checkpoint import find_latest

    ckpt = str(find_latest(reference_run))
    two = run_ranks(_outputs_from_checkpoint, 2, tmp_path / "ep2", ckpt, 2)
    one = run_ranks(_outputs_from_checkpoint, 1, tmp_path / "ep1", ckpt, 1)[0]
    for m in one:
        torch.testing.assert_close(torch.cat([two[0][m], two[1][m]]), one[m], atol=1e-5, rtol=1e-5)


def test_resume_on_one_rank_resets_optimizer_with_message(tmp_path, reference_run):
    """Resuming a 2-rank checkpoint with 1 process continues training and says the optimizer was reset."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    from s3dist.checkpoint import find_latest

    ckpt = find_latest(out)
    p = run_main("s3dist.train", ["--output_dir", out, "--resume", ckpt, *RUN, "stages.select_steps=25",
                                  "dist.ep_size=1"], world=1)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "optimizer and LR-scheduler state are reset" in p.stderr
    assert max(_losses(out)) == 65


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def test_export_loads_without_deepspeed_and_evaluates(tmp_path, reference_run):
    """`s3dist export` writes one safetensors file with every expert and the config; a fresh process
    loads it into an ep=1 model without DeepSpeed and `s3dist eval --model` evaluates it."""
    from safetensors.torch import load_file

    f = tmp_path / "model.safetensors"
    p = subprocess.run([sys.executable, "-m", "s3dist.cli", "export", "--run", str(reference_run), "--out", str(f)],
                       cwd=ROOT, env=launching.env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask  # shareable, not safetensors' owner-only
    tensors = load_file(str(f))
    experts = {k.split("deepspeed_experts.")[1].split(".")[0] for k in tensors if "deepspeed_experts" in k}
    assert experts == {str(i) for i in range(8)}  # 2 modalities x 4 experts, all in one file
    ev = subprocess.run([sys.executable, "-m", "s3dist.cli", "eval", "--model", str(f), "--data",
                         str(reference_run / "data"), "--keep-fraction", "0.5"],
                        cwd=ROOT, env=launching.env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert {r["keep_fraction"] for r in res["sweep"]} == {0.5, 1.0}
    assert 0.5 <= res["probe_accuracy"] <= 1.0


def test_eval_overrides_and_calibrated_stage3_do_not_depend_on_eval_batch(tmp_path, reference_run):
    """`s3dist eval --run DIR --keep-fraction P KEY=VALUE`: evaluation settings can be overridden; with the
    default calibrated Stage 3 the thresholds and accuracies at p=0.3 are the same for eval batch 32 and 256,
    no token is dropped; a key that would change the model is refused by name, before anything runs."""
    results = {}
    for bs in (32, 256):
        out = tmp_path / f"bs{bs}"
        ev = run_main("s3dist.cli", ["eval", "--run", reference_run, "--keep-fraction", "0.3", "--out", out,
                                     f"data.eval_batch_size={bs}"], world=1)
        assert ev.returncode == 0, ev.stderr[-3000:]
        results[bs] = json.loads((out / "eval.json").read_text())
    a, b = results[32], results[256]
    assert a["stage3"]["prune_threshold"] == "calibrated" and a["stage3"]["prune_unit"] == "token_pairs"
    assert a["stage3"]["thresholds"].keys() == {"0.3"}
    for layer, per in a["stage3"]["thresholds"]["0.3"].items():
        for m, t in per.items():
            assert t == pytest.approx(b["stage3"]["thresholds"]["0.3"][layer][m], abs=1e-6)
    assert [r["accuracy"] for r in a["sweep"]] == [r["accuracy"] for r in b["sweep"]]
    assert a["eval_dropped_fraction"] == b["eval_dropped_fraction"] == 0.0
    assert a["step"] == json.loads((reference_run / "eval.json").read_text())["step"] > 0  # the checkpoint's step

    # the same evaluation on 2 ranks, as `accelerate launch` runs it (each extracts its part; rank 0 probes)
    two = run_main("s3dist.cli", ["eval", "--run", reference_run, "--keep-fraction", "0.3", "--out", tmp_path / "two",
                                  "data.eval_batch_size=32"], world=2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    c = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert [r["keep_fraction"] for r in c["sweep"]] == [0.3, 1.0]
    assert [r["accuracy"] for r in c["sweep"]] == pytest.approx([r["accuracy"] for r in a["sweep"]], abs=1e-9)

    # a sweep into a folder that holds an evaluation extends it: its p's are evaluated again with the new one
    more = run_main("s3dist.cli", ["sweep", "--run", reference_run, "--keep-fractions", "0.6", "--out",
                                   tmp_path / "bs32", "data.eval_batch_size=32"], world=1)
    assert more.returncode == 0, more.stderr[-3000:]
    d = json.loads((tmp_path / "bs32" / "eval.json").read_text())
    assert [r["keep_fraction"] for r in d["sweep"]] == [0.3, 0.6, 1.0]
    assert d["stage3"]["thresholds"].keys() == {"0.3", "0.6"}
    bad = run_main("s3dist.cli", ["eval", "--run", reference_run, "--out", tmp_path / "bad", "model.d_model=8"],
                   world=1)
    assert bad.returncode == 2 and "cannot override ['model.d_model']" in bad.stderr
    assert not (tmp_path / "bad" / "eval.json").exists()


# ---------------------------------------------------------------------------------------------
# Failing clearly
# ---------------------------------------------------------------------------------------------


def test_incompatible_resume_is_refused(tmp_path, reference_run):
    """Resuming with another number of experts names the key, both values and the checkpoint."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    p = launching.run_forked(out, RUN + ["moe.num_experts=2"], extra=["--resume", "auto"])
    assert p.returncode != 0
    assert "moe.num_experts was 0 there but is 2 now" in p.stdout + p.stderr


def test_truncated_checkpoint_file_is_named(tmp_path, reference_run):
    """A truncated expert file fails the checksum check with the file's path, before DeepSpeed loads it; what a
    resume can take instead is the newest other complete checkpoint, or a fresh start when there is none."""
    import shutil

    from s3dist.checkpoint import CheckpointError, find_latest, read_meta, resume_instead

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    ckpt = find_latest(out)
    before = sorted(p for p in ckpt.parent.iterdir() if p.is_dir() and p.name < ckpt.name)[-1]
    victim = sorted(ckpt.glob("layer_*_expert_*"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{victim.name}' does not match its recorded sha256"):
        read_meta(ckpt)
    assert resume_instead(ckpt) == f"resume from the newest other complete checkpoint with --resume {before}"
    (ckpt / "s3dist_meta.json").unlink()
    with pytest.raises(CheckpointError, match="is incomplete: s3dist_meta.json is missing"):
        read_meta(ckpt)
    for other in ckpt.parent.iterdir():
        if other.is_dir() and other != ckpt:
            shutil.rmtree(other)
    assert resume_instead(ckpt) == f"there is no other complete checkpoint in '{ckpt.parent}': start the run over " \
                                   f"(--overwrite)"


def test_existing_run_is_not_overwritten(tmp_path, reference_run):
    """A fresh start in a directory holding a run is refused unless --resume or --overwrite is given."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    p = run_main("s3dist.train", ["--output_dir", out, *RUN], world=1)
    assert p.returncode == 2
    assert "already holds a run" in p.stderr and "--resume auto" in p.stderr and "--overwrite" in p.stderr
    assert (out / "checkpoints" / "latest").exists()


def _save_with_full_disk(rank, world, out_dir):
    """Save once, then make the second save fail half-way with ENOSPC."""
    import errno

    from s3dist import checkpoint as ck
    from s3dist.config import load_config
    from s3dist.dist import build_engine, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder

    cfg = load_config(None, ["model.d_model=16", "moe.expert_hidden=8"])
    make_dims(*init_distributed(cfg.dist), 1)
    model = S3Encoder({"a": 3}, cfg.model, cfg.moe)
    engine = build_engine(model, list(model.parameters()), lr=1e-3, total_steps=1, optim=cfg.optim,
                          dist_cfg=cfg.dist, micro_batch=2)
    state = ck.TrainState("specialize", 10, 10, False)
    first = ck.save(engine, out_dir, state, {"x": 1}, {"pos": 1}, keep_last=3)
    real = engine.save_checkpoint

    def failing(save_dir, tag, **kw):
        real(save_dir, tag, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    engine.save_checkpoint = failing
    state2 = ck.TrainState("specialize", 20, 20, False)
    try:
        ck.save(engine, out_dir, state2, {"x": 1}, {"pos": 2}, keep_last=3)
        raised = False
    except OSError:
        raised = True
    found = ck.find_latest(out_dir)
    ck.read_meta(found)  # still complete and verified
    return {"raised": raised, "latest": found.name, "first": first.name}


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path):
    """A save that dies half-way (ENOSPC) leaves `latest` on the previous, still-verifiable checkpoint."""
    res = run_ranks(_save_with_full_disk, 1, tmp_path)[0]
    assert res["raised"] and res["latest"] == res["first"] == "step-00000010-specialize"


def _nan_at_step_3(rank, world, out_dir, policy):
    from s3dist import objectives
    from s3dist import trainer as tr
    from s3dist.config import load_config
    from s3dist.train import run

    real = objectives.STAGE_LOSS["specialize"]
    calls = {"n": 0}

    def poisoned(engine, batch, cfg, mods):
        loss, terms = real(engine, batch, cfg, mods)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss * float("nan")
            terms = {**terms, "loss": loss}
        return loss, terms

    objectives.STAGE_LOSS["specialize"] = poisoned
    cfg = load_config(None, TINY + ["stages.specialize_steps=6", "stages.run=specialize", "eval.run_at_end=false",
                                    f"optim.nonfinite_loss={policy}", f"output_dir={out_dir / 'run'}",
                                    "logging.every_steps=2"])
    try:
        t = run(cfg)
        return {"skipped": t.state.skipped_steps, "error": None}
    except tr.NonFiniteLossError as e:
        return {"skipped": None, "error": str(e)}


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_loss_policy(tmp_path, policy):
    """NaN loss at step 3: 'skip' skips that step and counts it; 'stop' raises naming the step and
    saves the offending batch for inspection."""
    res = run_ranks(_nan_at_step_3, 1, tmp_path, policy)[0]
    if policy == "skip":
        assert res["skipped"] == 1
        rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["skipped_steps"] == 1
    else:
        assert "non-finite loss at specialize step 2 (global 2)" in res["error"]
        saved = list((tmp_path / "run").glob("nonfinite_step2_rank0.pt"))
        assert saved and "ids" in torch.load(saved[0], weights_only=False)


def test_dead_rank_stops_the_others_within_the_timeout(tmp_path):
    """Kill one worker mid-run: the job ends (non-zero) within dist.timeout_s plus start-up, never hangs. The
    surviving rank says in one line why it stops (no traceback of where it waited); torchrun names the dead one."""
    import psutil

    out = tmp_path / "run"
    proc = launching.start(out, RUN + ["stages.specialize_steps=100000", "dist.timeout_s=20"])
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "s3dist.train" in " ".join(c.cmdline())]
    assert len(workers) == 2, [c.cmdline() for c in workers]
    killed_at = time.monotonic()
    workers[1].kill()
    try:
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 120
    assert "s3dist: rank 0 stops: a collective failed because another rank is gone" in log, log[-3000:]
    assert "[rank0]: Traceback" not in log and "Signal 9 (SIGKILL) received by PID" in log, log[-3000:]


def _engine_precision_settings(rank, world, out_dir, check):
    from s3dist.config import load_config
    from s3dist.dist import build_engine, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder

    cfg = load_config(None, ["model.d_model=16", "moe.expert_hidden=8", f"dist.bf16_grad_check={check}"])
    make_dims(*init_distributed(cfg.dist), 1)
    model = S3Encoder({"a": 3}, cfg.model, cfg.moe)
    engine = build_engine(model, list(model.parameters()), lr=1e-3, total_steps=1, optim=cfg.optim,
                          dist_cfg=cfg.dist, micro_batch=2)
    bf16 = engine._config.bfloat16_config
    return {"enabled": bf16.enabled, "check": bf16.check_grad_overflow}


@pytest.mark.parametrize("check", [True, False])
def test_bf16_grad_check_reaches_deepspeed(tmp_path, check):
    """`dist.bf16_grad_check` is what DeepSpeed's engine reads (bf16 itself needs CUDA; fp32 here)."""
    res = run_ranks(_engine_precision_settings, 1, tmp_path, check)[0]
    assert res == {"enabled": False, "check": check}


def test_optimizer_state_is_reused_only_on_the_layout_that_wrote_it():
    """The optimizer state is reset, with the reason, when the ranks, the expert-parallel size or the
    parameter layout differ: a checkpoint from before the stacked experts (no layout key) or the stacked
    per-modality parameters (`expert_layout: stacked`) has optimizer state for other tensors (Stage 1: a flat
    ZeRO buffer in the old parameter order; Stage 2: one entry per router of each modality, now one per layer)."""
    from s3dist.checkpoint import PARAM_LAYOUT, optimizer_state_mismatch

    def meta(stage="specialize", world=2, ep=2, layout=None):
        m = {"world_size": world, "config": {"dist": {"ep_size": ep}}, "state": {"stage": stage}, "version": "0.9"}
        return {**m, **({"param_layout": PARAM_LAYOUT} if layout is None else layout)}

    assert optimizer_state_mismatch(meta(), 2, 2) is None
    assert "written by 2 ranks, this run has 1" in optimizer_state_mismatch(meta(), 1, 1)
    assert "dist.ep_size=2, this run has 1" in optimizer_state_mismatch(meta(), 2, 1)
    assert "dist.ep_size=2" in optimizer_state_mismatch(meta(ep=0), 2, 1)  # ep_size 0: the world size
    oldest = optimizer_state_mismatch(meta(layout={}), 2, 2)
    assert "s3dist 0.9 with one parameter per expert" in oldest and "reset" in oldest
    stacked_experts = optimizer_state_mismatch(meta(layout={"expert_layout": "stacked"}), 2, 2)
    assert "with stacked experts and per-modality modules" in stacked_experts and "reset" in stacked_experts
    assert "reset" in optimizer_state_mismatch(meta(stage="select", layout={"expert_layout": "stacked"}), 2, 2)
    assert optimizer_state_mismatch(meta(stage="select"), 2, 2) is None


def test_resume_of_a_finished_run_evaluates_the_trained_weights(tmp_path, reference_run):
    """`--resume auto` on a run whose stages had all finished (a requeue after training, or a job that died in
    the final evaluation) trains nothing and evaluates the last checkpoint's weights: the same eval.json as
    the run's own evaluation, on 2 ranks. (It used to evaluate the initial weights, and with ep=2 the
    routers had no expert-parallel group, so Stage 3's calibration crashed in a mismatched all-to-all.)"""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    (out / "eval.json").unlink()
    p = launching.run_forked(out, launching.REFERENCE, extra=["--resume", "auto"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "had finished: loaded its weights, nothing to train" in p.stderr
    assert "Stage 2 trains routers only" not in p.stderr  # nothing trains, and the log does not say otherwise
    got, want = (json.loads((d / "eval.json").read_text()) for d in (out, reference_run))
    assert got["sweep"] == want["sweep"] and got["stage3"] == want["stage3"]
    assert max(_losses(out)) == max(_losses(reference_run))  # no step trained
