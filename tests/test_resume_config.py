"""A resume continues the run with the run's own config (issue #19).

`--resume` takes every key from the checkpoint's config (= `<run>/config.yaml`) except the ones the
command gives and a resume may change (`s3dist.resume.RESUMABLE_KEYS`); any other change is refused,
naming every key and both values, before anything is written, unless `--force-config` (then recorded
in `<run>/config_changes.jsonl`). Fast tests work on checkpoint meta files written here; the slow ones
resume real 2-process `accelerate launch` runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from s3dist.checkpoint import CheckpointError
from s3dist.config import ConfigError, iter_fields, load_config, save_config, to_dict
from s3dist.resume import RESUMABLE_KEYS, SHAPE_KEYS, resumable, resume_config
from tests import launching
from tests.launching import TINY

START = ["optim.lr=0.001", "data.batch_size=32", "stages.specialize_steps=10", "moe.aux_loss_weight=0.02"]


def _fake_run(run_dir: Path, overrides: list[str]) -> Path:
    """A run directory as a finished job leaves it: config.yaml and one published checkpoint's meta."""
    cfg = load_config(None, overrides + [f"output_dir={run_dir}"])
    cfg.data.modalities = ["text", "audio"]  # resolved from the data set, as s3dist.train stores it
    ckpt = run_dir / "checkpoints" / "step-00000010-specialize"
    ckpt.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    meta = {"version": "test", "tag": ckpt.name, "world_size": 2, "checksums": {}, "config": to_dict(cfg),
            "state": {"stage": "specialize", "stage_step": 10, "global_step": 10, "stage_done": True}}
    (ckpt / "s3dist_meta.json").write_text(json.dumps(meta))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
    return ckpt


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "s3dist_meta.json").read_text())


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(run_dir.rglob("*"))}


def test_resumable_keys_are_real_keys_and_shape_keys_are_not_resumable():
    """Every entry of RESUMABLE_KEYS names at least one config key (a typo would silently refuse it), and no
    key that shapes the weights may change across a resume."""
    keys = [k for k, _, _ in iter_fields(load_config())]
    for entry in RESUMABLE_KEYS:
        assert any(k == entry or (entry[-1] in "._" and k.startswith(entry)) for k in keys), entry
    assert set(SHAPE_KEYS) <= set(keys)
    assert not any(resumable(k) for k in SHAPE_KEYS)
    assert resumable("logging.every_steps") and resumable("stages.prune_layers") and resumable("dist.ep_size")
    assert not any(resumable(k) for k in ("optim.lr", "stages.supcon_weight", "data.batch_size", "seed"))


def test_keys_the_command_does_not_give_keep_the_runs_values(tmp_path):
    """A resume that leaves off overrides given at the start keeps the run's values (not the defaults);
    a changed step count is taken; the same command line again (a SLURM requeue) changes nothing."""
    ckpt = _fake_run(tmp_path / "run", START)
    command = load_config(None, ["stages.specialize_steps=15", "resume=auto", f"output_dir={tmp_path / 'run'}"])
    cfg, changed, forced = resume_config(_meta(ckpt), ckpt, command, {"stages.specialize_steps", "resume",
                                                                        "output_dir"})
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.moe.aux_loss_weight) == (0.001, 32, 0.02)
    assert cfg.data.modalities == ["text", "audio"]
    assert cfg.stages.specialize_steps == 15 and cfg.resume == "auto"
    assert changed == [("stages.specialize_steps", 10, 15)] and forced == []

    again = START + ["resume=auto", f"output_dir={tmp_path / 'run'}"]
    given = {a.split("=")[0] for a in again}
    cfg, changed, forced = resume_config(_meta(ckpt), ckpt, load_config(None, again), given)
    assert changed == forced == [] and cfg.optim.lr == 0.001


def test_changed_run_keys_are_refused_by_name_unless_forced(tmp_path):
    """optim.lr and moe.aux_loss_weight changed: refused, naming both keys with both values; with force
    they are taken and returned as forced; a key that shapes the weights is refused even with force."""
    ckpt = _fake_run(tmp_path / "run", START)
    command = load_config(None, START + ["optim.lr=0.002", "moe.aux_loss_weight=0.05", "logging.every_steps=2"])
    given = {"optim.lr", "moe.aux_loss_weight", "logging.every_steps", "data.batch_size"}
    with pytest.raises(ConfigError) as e:
        resume_config(_meta(ckpt), ckpt, command, given)
    msg = str(e.value)
    assert "optim.lr was 0.001 there but is 0.002 now" in msg
    assert "moe.aux_loss_weight was 0.02 there but is 0.05 now" in msg
    assert "logging.every_steps" not in msg.split(". A resume")[0] and "--force-config" in msg
    cfg, changed, forced = resume_config(_meta(ckpt), ckpt, command, given, force=True)
    assert forced == [("moe.aux_loss_weight", 0.02, 0.05), ("optim.lr", 0.001, 0.002)]
    assert changed == [("logging.every_steps", 10, 2)] and cfg.optim.lr == 0.002
    wider = load_config(None, START + ["model.d_model=32"])
    with pytest.raises(ConfigError, match=r"model.d_model was 64 there but is 32 now.*not even --force-config"):
        resume_config(_meta(ckpt), ckpt, wider, {"model.d_model"}, force=True)


def test_refused_resume_exits_2_before_anything_is_written(tmp_path, capsys):
    """`s3dist.train --resume auto` with a changed optim.lr (here from a recipe file: recipe keys count as
    given) exits 2 naming the key and both values, and leaves the run directory exactly as it was."""
    from s3dist.train import main

    run_dir = tmp_path / "run"
    _fake_run(run_dir, START)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"optim": {"lr": 0.002}, "data": {"batch_size": 32}}))
    before = _snapshot(run_dir)
    rc = main(["--config", str(recipe), "--output_dir", str(run_dir), "--resume", "auto"])
    err = capsys.readouterr().err
    assert rc == 2 and "optim.lr was 0.001 there but is 0.002 now" in err, err
    assert "data.batch_size" not in err
    assert _snapshot(run_dir) == before



@pytest.mark.parametrize("error,kind", [("ConfigError", "config error"), ("CheckpointError", "checkpoint error"),
                                        ("DataError", "data error"), ("RunLockError", "run directory busy")])
def test_train_main_reports_what_a_user_can_fix_in_one_line_and_re_raises_bugs(tmp_path, capsys, monkeypatch,
                                                                               error, kind):
    """Each error a user can fix, wherever the job raises it, ends `s3dist.train` with exit code 2 and one
    line naming its kind and the message (no traceback); anything else is a bug and propagates."""
    import s3dist.train as train
    from s3dist.data import DataError
    from s3dist.runlock import RunLockError

    cls = {"ConfigError": ConfigError, "CheckpointError": CheckpointError, "DataError": DataError,
           "RunLockError": RunLockError}[error]

    def failing(cfg, plan):
        raise cls("what went wrong, and what to do")

    monkeypatch.setattr(train, "run", failing)
    assert train.main(["--output_dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"s3dist: {kind}: what went wrong, and what to do"
    monkeypatch.setattr(train, "run", lambda cfg, plan: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.main(["--output_dir", str(tmp_path / "run")])
    # a bad value on the command line is refused before anything runs
    assert train.main(["--output_dir", str(tmp_path / "run"), "optim.lr=-1"]) == 2
    assert "s3dist: config error: config key 'optim.lr' = -1.0 is out of range" in capsys.readouterr().err

def test_auto_resume_without_a_checkpoint_is_a_fresh_start(tmp_path):
    """'auto' in a directory without a checkpoint compares nothing: the command's config as it is."""
    from s3dist.resume import plan_resume

    (tmp_path / "run").mkdir()
    command = load_config(None, ["optim.lr=0.002", "resume=auto", f"output_dir={tmp_path / 'run'}"])
    cfg, plan = plan_resume(command, {"optim.lr"}, False, tmp_path / "run")
    assert plan.checkpoint is None and cfg is command


def test_explicit_checkpoint_without_meta_exits_2(tmp_path, capsys):
    from s3dist.train import main

    ckpt = _fake_run(tmp_path / "run", START)
    (ckpt / "s3dist_meta.json").unlink()
    assert main(["--output_dir", str(tmp_path / "run"), "--resume", str(ckpt)]) == 2
    assert "s3dist_meta.json is missing" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        from s3dist.checkpoint import read_meta

        read_meta(ckpt)


def test_an_explicit_resume_path_must_be_a_checkpoint_this_directory_can_continue(tmp_path, capsys):
    """`--resume PATH` of something that is not a checkpoint names what it is and what to give; another run's
    checkpoint (or one set aside) into a directory with checkpoints of its own is refused before anything is
    written, while into a new directory it branches the run."""
    from s3dist.resume import plan_resume
    from s3dist.train import main

    other = _fake_run(tmp_path / "other", START)
    own = _fake_run(tmp_path / "run", START)
    before = _snapshot(tmp_path / "run")
    cases = [(tmp_path / "nothing", "no such checkpoint"),
             (tmp_path / "other", f"it is a run directory: continue it with --output_dir {tmp_path / 'other'} "
                                  f"--resume auto"),
             (tmp_path / "other" / "checkpoints", f"give one, e.g. --resume {other}"),
             (tmp_path / "run" / "config.yaml", "a checkpoint is a folder RUN/checkpoints/step-..."),
             (other, f"is not a checkpoint of output_dir '{tmp_path / 'run'}', which has checkpoints of its own "
                     f"(newest {own.name})")]
    for path, needle in cases:
        assert main(["--output_dir", str(tmp_path / "run"), "--resume", str(path)]) == 2, path
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (path, err)
    assert _snapshot(tmp_path / "run") == before
    command = load_config(None, START + ["output_dir=" + str(tmp_path / "new"), f"resume={other}"])
    assert plan_resume(command, set(), False, tmp_path / "new")[1].checkpoint == other


# ---------------------------------------------------------------------------------------------
# Real 2-process runs
# ---------------------------------------------------------------------------------------------

BASE = TINY + ["stages.run=specialize", "stages.specialize_steps=10", "checkpoint.every_steps=5",
               "eval.run_at_end=false", "dist.ep_size=2"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    p = launching.run_forked(out, BASE + ["optim.lr=0.001"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def _copy(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


@pytest.mark.slow
def test_changed_lr_refused_then_forced_and_recorded(tmp_path, base_run, capsys):
    """On a real run: optim.lr changed on resume is refused (exit 2, key and both values, run directory
    untouched); with --force-config the run continues with it, warns, and records it."""
    from s3dist.train import main

    out = _copy(base_run, tmp_path)
    before = _snapshot(out)
    assert main(["--output_dir", str(out), "--resume", "auto", *BASE, "optim.lr=0.002"]) == 2
    assert "optim.lr was 0.001 there but is 0.002 now" in capsys.readouterr().err
    assert _snapshot(out) == before

    p = launching.run_forked(out, BASE + ["optim.lr=0.002", "stages.specialize_steps=15"],
                      extra=["--resume", "auto", "--force-config"])
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "--force-config: optim.lr 0.001 -> 0.002" in log
    (row,) = [json.loads(ln) for ln in (out / "config_changes.jsonl").read_text().splitlines()]
    assert row["checkpoint"] == "step-00000010-specialize" and row["time"]
    assert row["forced"] == [{"key": "optim.lr", "old": 0.001, "new": 0.002}]
    assert row["changed"] == [{"key": "stages.specialize_steps", "old": 10, "new": 15}]
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.002
    rows = _rows(out)
    # the optimizer state was loaded (same stage, world and ep_size) and still takes the forced peak lr
    assert [r["step"] for r in rows] == [5, 10, 15] and rows[-1]["lr"] == pytest.approx(0.002 * 16 / 20)


@pytest.mark.slow
def test_resume_without_an_override_keeps_it_and_runs_to_the_new_step_count(tmp_path, base_run):
    """The resume command leaves off optim.lr=0.001 (given at the start) and raises the Stage-1 step
    count: the run keeps lr 0.001 (not the default 0.002) and continues to step 15."""
    out = _copy(base_run, tmp_path)
    p = launching.run_forked(out, BASE + ["stages.specialize_steps=15"], extra=["--resume", "auto"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 0.001 and cfg["stages"]["specialize_steps"] == 15
    rows = _rows(out)
    assert [r["step"] for r in rows] == [5, 10, 15]
    # still in the 20-step warm-up: lr = peak * 16/20 after 15 steps, with the run's peak (not the default 0.002)
    assert rows[-1]["lr"] == pytest.approx(0.001 * 16 / 20)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000015-specialize"


@pytest.mark.slow
def test_ep_size_change_at_same_world_resets_the_optimizer_with_a_message(tmp_path, base_run):
    """2 ranks, ep_size 2 -> 1 mid-stage: experts are resharded, the optimizer state (which covers the
    experts each rank held) is not loaded, a message says so, and training continues to the end."""
    out = _copy(base_run, tmp_path)
    p = launching.run_forked(out, BASE + ["dist.ep_size=1", "stages.specialize_steps=15"], extra=["--resume", "auto"])
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert log.count("written with dist.ep_size=2, this run has 1 (same 2 ranks)") == 1, log[-3000:]  # rank 0 says it
    assert "optimizer and LR-scheduler state are reset" in log
    rows = _rows(out)
    assert [r["step"] for r in rows] == [5, 10, 15] and all(r["loss"] == r["loss"] for r in rows)
    assert yaml.safe_load((out / "config.yaml").read_text())["dist"]["ep_size"] == 1


def _checkpoint_at(run_dir: Path, step: int, stage: str, stage_step: int, done: bool) -> Path:
    """Another published checkpoint (meta only) in a `_fake_run` directory."""
    meta = _meta(next((run_dir / "checkpoints").glob("step-*")))
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}-{stage}"
    ckpt.mkdir()
    meta.update(tag=ckpt.name, state={"stage": stage, "stage_step": stage_step, "global_step": step,
                                      "stage_done": done})
    (ckpt / "s3dist_meta.json").write_text(json.dumps(meta))
    return ckpt


def test_stage_step_counts_change_only_while_their_stage_can_take_them(tmp_path):
    """Raising stages.specialize_steps once Stage 2 has started would be recorded and never run, and a count
    below the steps a stage has run cannot be met: both are refused, naming the key, the checkpoint and
    what to do. Raising the count of the stage in progress (or just finished, before the next) continues it."""
    ckpt = _fake_run(tmp_path / "run", START)  # Stage 1 done at 10 steps, Stage 2 not started
    given = {"stages.specialize_steps", "stages.select_steps"}
    cfg, changed, _ = resume_config(_meta(ckpt), ckpt, load_config(None, START + ["stages.specialize_steps=15"]),
                                    given)
    assert cfg.stages.specialize_steps == 15 and changed == [("stages.specialize_steps", 10, 15)]
    in_select = _checkpoint_at(tmp_path / "run", 13, "select", 3, False)
    with pytest.raises(ConfigError, match=r"stages\.specialize_steps cannot change from 10 to 15.*Stage 1 finished.*"
                                          r"step-00000013-select.*new --output_dir"):
        resume_config(_meta(in_select), in_select, load_config(None, START + ["stages.specialize_steps=15"]), given)
    with pytest.raises(ConfigError, match=r"stages\.select_steps = 2 is below the 3 Stage 2 steps.*at least 3"):
        resume_config(_meta(in_select), in_select, load_config(None, START + ["stages.select_steps=2"]), given)
    cfg, _, _ = resume_config(_meta(in_select), in_select, load_config(None, START + ["stages.select_steps=90"]),
                              given)
    assert cfg.stages.select_steps == 90


def test_a_forced_stage_list_does_not_send_a_resume_back_to_a_finished_stage(tmp_path):
    """`stages.run=[specialize]` forced onto a Stage-2 checkpoint would train Stage 1 again on Stage 2's weights:
    refused, naming the checkpoint and both ways on. Dropping the finished stage, or ending with Stage 3, is fine."""
    _fake_run(tmp_path / "run", START)
    in_select = _checkpoint_at(tmp_path / "run", 13, "select", 3, False)
    given = {"stages.run"}
    for run in ("specialize", "specialize,sparsify"):
        with pytest.raises(ConfigError, match=r"cannot resume checkpoint 'step-00000013-select': it is in Stage 2.*"
                                              r"Stage 1 \(specialize\) has finished.*new --output_dir.*include select"):
            resume_config(_meta(in_select), in_select, load_config(None, START + [f"stages.run={run}"]), given,
                          force=True)
    for run in ("select,sparsify", "sparsify"):
        cfg, _, forced = resume_config(_meta(in_select), in_select, load_config(None, START + [f"stages.run={run}"]),
                                       given, force=True)
        assert cfg.stages.run == run.split(",") and forced


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    """Resuming step 5 of a run that reached step 10 abandons step 10: it moves to checkpoints/abandoned-*
    (kept), `latest` names step 5, and neither pruning nor `--resume auto` sees the abandoned line again."""
    from s3dist.checkpoint import _complete, _prune, find_latest, set_aside_later_checkpoints

    run = tmp_path / "run"
    newest = _fake_run(run, START)
    older = _checkpoint_at(run, 5, "specialize", 5, False)
    assert find_latest(run) == newest
    assert set_aside_later_checkpoints(run, older) == [newest]
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert (aside / newest.name / "s3dist_meta.json").exists() and not newest.exists()
    assert (run / "checkpoints" / "latest").read_text() == older.name and find_latest(run) == older
    assert set_aside_later_checkpoints(run, older) == []  # the newest already: nothing to move
    step7 = _checkpoint_at(run, 7, "specialize", 7, False)
    _prune(run / "checkpoints", keep_last=1)  # the new line's checkpoint stays, the abandoned one is untouched
    assert _complete(run / "checkpoints") == [step7] and (aside / newest.name).exists()


def test_an_empty_latest_or_a_save_cut_short_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    from s3dist.checkpoint import _prune, find_latest

    run = tmp_path / "run"
    newest = _fake_run(run, START)
    (run / "checkpoints" / "latest").write_text("")  # a write of 'latest' cut short
    assert find_latest(run) == newest
    (run / "checkpoints" / ".tmp-step-00000011-specialize").mkdir()  # a save killed mid-way
    _prune(run / "checkpoints", keep_last=2)
    assert not (run / "checkpoints" / ".tmp-step-00000011-specialize").exists() and newest.exists()


def test_the_embedded_data_set_is_made_anew_at_every_fresh_start(tmp_path):
    """A data/ folder left by a failed attempt or by the run --overwrite replaces may come from other
    data.synth values: a fresh start regenerates it; only a resume reuses it."""
    from s3dist.data.manifest import read_manifest
    from s3dist.train import prepare_data

    small = load_config(None, ["data.synth.num_train=64", "data.synth.num_val=16", "data.synth.num_test=16"])
    url = prepare_data(small, tmp_path, True, fresh=True)
    assert read_manifest(url).splits["train"].rows == 64
    larger = load_config(None, ["data.synth.num_train=96", "data.synth.num_val=16", "data.synth.num_test=16"])
    assert read_manifest(prepare_data(larger, tmp_path, True, fresh=False)).splits["train"].rows == 64
    assert read_manifest(prepare_data(larger, tmp_path, True, fresh=True)).splits["train"].rows == 96


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_continues_that_line(tmp_path, base_run):
    """A real run that reached step 10 resumed from its step-5 checkpoint: it trains steps 6-10 again, its
    new step-10 checkpoint is published (not pruned in favour of the old one), the old line is kept aside,
    and the metrics hold each step once."""
    out = _copy(base_run, tmp_path)
    p = launching.run_forked(out, BASE, extra=["--resume", str(out / "checkpoints" / "step-00000005-specialize")])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "the later step-00000010-specialize moved to" in p.stdout + p.stderr
    (aside,) = (out / "checkpoints").glob("abandoned-*")
    assert (aside / "step-00000010-specialize" / "s3dist_meta.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000010-specialize"
    assert (out / "checkpoints" / "step-00000010-specialize" / "s3dist_meta.json").exists()
    assert [r["step"] for r in _rows(out)] == [5, 10]


@pytest.mark.slow
def test_auto_resume_before_the_first_checkpoint_logs_each_step_once(tmp_path, base_run):
    """A job killed before its first checkpoint leaves metrics rows; `--resume auto` starts fresh and must not
    keep them next to the new ones."""
    out = _copy(base_run, tmp_path)
    shutil.rmtree(out / "checkpoints")
    p = launching.run_forked(out, BASE, extra=["--resume", "auto"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [r["step"] for r in _rows(out)] == [5, 10]


def test_a_relative_data_path_is_stored_absolute_and_an_older_relative_one_still_resumes(tmp_path, monkeypatch):
    """eval / export / embed read data.path from the run, from any directory: the command's relative path is
    made absolute. A run that stored it relative (before) resumes from the same directory with the same
    command, without a 'data.path changed' refusal."""
    from s3dist.train import parse_args

    monkeypatch.chdir(tmp_path)
    _, cfg = parse_args(["data.path=data/mine"])
    assert cfg.data.path == str(tmp_path / "data" / "mine")
    assert parse_args(["data.path=s3://bucket/mine"])[1].data.path == "s3://bucket/mine"
    ckpt = _fake_run(tmp_path / "run", START + ["data.path=data/mine"])  # stored as given
    _, command = parse_args(START + ["data.path=data/mine"])
    cfg, changed, forced = resume_config(_meta(ckpt), ckpt, command, {"data.path"})
    assert cfg.data.path == str(tmp_path / "data" / "mine") and not changed and not forced


def test_empty_stage_list_and_probe_grid_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"'stages\.run' is empty"):
        load_config(None, ["stages.run=[]"])
    with pytest.raises(ConfigError, match=r"'eval\.probe_Cs' is empty"):
        load_config(None, ["eval.probe_Cs=[]"])
