"""One job per run directory, and no rank outlives its launcher (issue #19).

Fast tier (single process, plus tiny helper processes without torch): the lock rule, the lock
files, takeover of dead holders, racing jobs, the heartbeat, and a worker dying with its launcher.
Slow tier (real 2-process `accelerate launch` jobs on CPU/gloo): SIGKILL of the launcher alone
ends every rank and `--resume auto` then finishes like an uninterrupted run; a second job on a
held run directory is refused before it writes anything; a real run takes over a stale lock.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3dist import runlock
from tests import launching
from tests.launching import REFERENCE, ROOT, TINY
from tests.multirank import run_main

HOST = socket.gethostname()


def _gone(pid: int) -> bool:
    """No such process, or a zombie (it runs no code; its new parent may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


def _kill_exactly(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _record(**kw) -> dict:
    rec = {"host": "node-b", "pid": 4242, "user": "someone", "slurm_job": None, "slurm_restart": 0,
           "start": "2026-12-01T10:00:00+0000", "start_unix": 0.0, "heartbeat": time.time(),
           "heartbeat_every_s": 1.0, "token": "t" * 32, "boot_id": None, "proc_start": None}
    rec.update(kw)
    return rec


def _plant(run_dir: Path, rec: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps(rec))


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------

NOW = 1_000_000.0
ME = {"host": "node-a", "pid": 1, "slurm_job": None, "slurm_restart": 0}


@pytest.mark.parametrize("rec, me, flock_free, alive, expect", [
    (None, ME, True, False, "free"),
    (None, ME, False, False, "held"),                          # a starter between flock and record
    ({}, ME, True, False, "takeover"),                         # unreadable record, nobody holds the flock
    ({}, ME, False, False, "held"),
    (_record(host="node-a"), ME, True, False, "takeover"),     # same host, flock free, process gone
    (_record(host="node-a"), ME, False, False, "held"),        # same host, flock held
    (_record(host="node-a"), ME, None, True, "held"),          # no flock support: the live pid decides
    (_record(host="node-a"), ME, None, False, "takeover"),
    (_record(heartbeat=NOW - 10), ME, True, False, "held"),    # other host: heartbeat is the truth,
    (_record(heartbeat=NOW - 100), ME, False, False, "takeover"),  # whatever its flock says
    (_record(heartbeat=NOW - 100, heartbeat_every_s=50.0), ME, True, False, "held"),  # its own beat is slow
    (_record(heartbeat=NOW, slurm_job="7"), {**ME, "slurm_job": "7", "slurm_restart": 1}, False, True,
     "takeover"),                                              # requeue of the same job: fresh or not
    (_record(heartbeat=NOW, slurm_job="7", slurm_restart=1), {**ME, "slurm_job": "7", "slurm_restart": 1},
     True, False, "held"),                                     # the same attempt twice is no requeue
    (_record(heartbeat=NOW, slurm_job="8"), {**ME, "slurm_job": "7", "slurm_restart": 3}, True, False,
     "held"),                                                  # another job
])
def test_judge(rec, me, flock_free, alive, expect):
    """Who may take a run directory: free, a dead holder (this host: flock free and process gone;
    another host: heartbeat older than stale_s, or 3 of its own beats), or an earlier run of the
    same SLURM job; everyone else is refused."""
    verdict, why = runlock.judge(rec, me, flock_free=flock_free, now=NOW, stale_s=30.0,
                                 alive_here=lambda r: alive)
    assert verdict == expect, why


# ---------------------------------------------------------------------------------------------
# The lock files
# ---------------------------------------------------------------------------------------------


def test_record_names_the_holder_beats_and_is_removed_on_release(tmp_path):
    """The holder's record names host, pid, user, start and SLURM job, its heartbeat advances, and
    release removes it (the flock file stays: deleting a lock file others may hold races)."""
    run_dir = tmp_path / "run"
    lock = runlock.acquire(run_dir, stale_s=0.5)
    try:
        rec = json.loads((run_dir / runlock.LOCK_FILE).read_text())
        assert rec["host"] == HOST and rec["pid"] == os.getpid() and rec["start"] and rec["user"]
        first = rec["heartbeat"]
        time.sleep(0.3)
        assert json.loads((run_dir / runlock.LOCK_FILE).read_text())["heartbeat"] > first
    finally:
        lock.release()
    assert sorted(p.name for p in run_dir.iterdir()) == [runlock.FLOCK_FILE]
    runlock.acquire(run_dir, stale_s=0.5).release()  # free again


HOLD = ("import sys, time\n"
        "from s3dist import runlock\n"
        "runlock.acquire(sys.argv[1], float(sys.argv[2]))\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def _holder(run_dir: Path, stale_s: float = 60.0) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(stale_s)], cwd=ROOT, env=launching.env(),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_live_holder_on_this_host_is_refused_and_its_death_frees_the_directory(tmp_path, caplog):
    """A live holder on this host: refused, the message names its host and pid, nothing is written.
    After it is SIGKILLed (its flock goes with it, its record stays), the lock is taken over with a
    warning that names the dead holder."""
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        before = json.loads((run_dir / runlock.LOCK_FILE).read_text())
        with pytest.raises(runlock.RunLockError) as e:
            runlock.acquire(run_dir, stale_s=60.0)
        assert f"host {HOST}" in str(e.value) and f"pid {holder.pid}" in str(e.value)
        assert json.loads((run_dir / runlock.LOCK_FILE).read_text())["token"] == before["token"]
        assert sorted(p.name for p in run_dir.iterdir()) == [runlock.FLOCK_FILE, runlock.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        lock = runlock.acquire(run_dir, stale_s=60.0)
    lock.release()
    assert f"took over the lock of host {HOST}, pid {holder.pid}" in caplog.text
    assert f"its process {holder.pid} on this host is gone" in caplog.text


def test_heartbeat_of_another_host_decides(tmp_path, caplog):
    """A record from another host (a shared file system): refused while its heartbeat is younger than
    checkpoint.lock_stale_s, naming host and pid; taken over with a warning once it is older."""
    run_dir = tmp_path / "run"
    _plant(run_dir, _record(host="node-b", pid=4242, heartbeat=time.time() - 5))
    with pytest.raises(runlock.RunLockError, match="in use by another job: host node-b, pid 4242"):
        runlock.acquire(run_dir, stale_s=30.0)
    _plant(run_dir, _record(host="node-b", pid=4242, heartbeat=time.time() - 60))
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        lock = runlock.acquire(run_dir, stale_s=30.0)
    try:
        assert json.loads((run_dir / runlock.LOCK_FILE).read_text())["host"] == HOST
        assert "took over the lock of host node-b, pid 4242" in caplog.text
        assert "heartbeat is older than 30 s" in caplog.text
    finally:
        lock.release()


def test_requeued_slurm_job_takes_over_its_own_fresh_lock(tmp_path, monkeypatch, caplog):
    """A SLURM requeue (same job id, higher SLURM_RESTART_COUNT) takes over its previous run's lock
    even with a fresh heartbeat (its processes were killed, possibly on another node); another job,
    or the same attempt again, is refused."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.delenv("SLURM_CLUSTER_NAME", raising=False)
    _plant(run_dir, _record(host="node-b", slurm_job="1234", slurm_restart=0, heartbeat=time.time()))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(runlock.RunLockError, match="SLURM job 1234"):
        runlock.acquire(run_dir, stale_s=300.0)
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(runlock.RunLockError):
        runlock.acquire(run_dir, stale_s=300.0)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        lock = runlock.acquire(run_dir, stale_s=300.0)
    lock.release()
    assert "previous run (restart 0): a requeue" in caplog.text


def _race(run_dir, start, results, no_flock, stay):
    if no_flock:  # as between hosts on a file system that does not honour flock
        runlock._try_flock = lambda fd: None
    start.wait()
    try:
        runlock.acquire(run_dir, stale_s=60.0, heartbeat=False)
        results.put("won")
        stay.wait(30)  # keep the lock while the others look
    except runlock.RunLockError:
        results.put("refused")


@pytest.mark.parametrize("case", ["empty_dir", "stale_record_no_flock", "empty_dir_no_flock"])
def test_only_one_of_racing_jobs_gets_the_lock(tmp_path, case):
    """Six jobs start on one directory at once (an empty one, or one with a dead other-host record,
    with and without flock): exactly one gets it (link(2) creates, rename-aside takes over)."""
    run_dir = tmp_path / "run"
    if case.startswith("stale"):
        _plant(run_dir, _record(host="node-b", heartbeat=time.time() - 3600))
    ctx = multiprocessing.get_context("fork")
    start, stay, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(run_dir, start, results, case.endswith("no_flock"), stay))
             for _ in range(6)]
    for p in procs:
        p.start()
    try:
        start.set()
        outcomes = sorted(results.get(timeout=60) for _ in procs)
    finally:
        stay.set()
        for p in procs:
            p.join(timeout=30)
    assert outcomes == ["refused"] * 5 + ["won"], outcomes


def test_heartbeat_notices_a_lost_lock(tmp_path):
    """A holder whose record was taken over (it stalled longer than lock_stale_s) notices at its next
    heartbeat and stops (by default the process exits) instead of writing on beside the new holder."""
    run_dir = tmp_path / "run"
    lost = []
    lock = runlock.acquire(run_dir, stale_s=0.5, heartbeat=False)
    lock.on_lost = lambda lk, holder: lost.append(holder)
    lock.start_heartbeat()
    try:
        (run_dir / runlock.LOCK_FILE).write_text(json.dumps(_record(host="node-c", pid=77)))
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost and lost[0]["host"] == "node-c"
    finally:
        lock.release()
    assert (run_dir / runlock.LOCK_FILE).exists(), "release must not delete another job's record"


# ---------------------------------------------------------------------------------------------
# A worker dies with its launcher
# ---------------------------------------------------------------------------------------------

WORKER = ("import os, sys, time\n"
          "if sys.argv[1] == 'poll':\n"
          "    sys.platform = 'other'  # no prctl: the fallback thread\n"
          "from s3dist.launch import exit_with_launcher\n"
          "print(exit_with_launcher(poll_s=0.1), os.getpid(), flush=True)\n"
          "time.sleep(600)\n")
LAUNCHER = ("import subprocess, sys, time\n"
            "w = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], start_new_session=True)\n"
            "time.sleep(600)\n")


@pytest.mark.parametrize("how", ["prctl", "poll"])
def test_worker_in_its_own_session_dies_with_its_launcher(how):
    """Like torchrun's workers (own session, so a process-group kill misses them): once the launcher
    is SIGKILLed, a worker that called exit_with_launcher is gone within seconds."""
    env = dict(launching.env(), TORCHELASTIC_RUN_ID="test")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER, how], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, text=True)
    watched, worker = (int(x) for x in launcher.stdout.readline().split())
    try:
        assert watched == launcher.pid
        assert os.getsid(worker) != os.getsid(launcher.pid)
        time.sleep(0.3)
        assert not _gone(worker), "the worker must live while its launcher does"
        launcher.kill()
        launcher.wait()
        assert _wait_gone([worker], 10) == []
    finally:
        launcher.kill()
        _kill_exactly([worker])


def test_without_a_launcher_nothing_is_armed():
    """`python -m s3dist.train` started by hand (under nohup, say) must not die with its shell, also where the
    shell's environment has a launcher's variables in it: ACCELERATE_USE_CPU exported by the user, or an
    S3DIST_LAUNCHER_PID inherited from a launcher that is alive but not this process's parent (pid 1 here)."""
    env = {k: v for k, v in launching.env().items()
           if k not in ("TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "S3DIST_LAUNCHER_PID")}
    for extra in ({}, {"ACCELERATE_USE_CPU": "true"}, {"S3DIST_LAUNCHER_PID": "1"}):
        p = subprocess.run([sys.executable, "-c", "from s3dist.launch import exit_with_launcher as e; print(e())"],
                           cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.strip() == "None", (extra, p.returncode, p.stderr)


# ---------------------------------------------------------------------------------------------
# Real jobs
# ---------------------------------------------------------------------------------------------

# The session's reference command (tests/launching.py: 40 + 20 steps, a checkpoint every 10, ep=2); keeping 2
# checkpoints and skipping the evaluation change no weight and no logged loss: `reference_run` is this job
# uninterrupted.
RUN = REFERENCE + ["checkpoint.keep_last=2", "eval.run_at_end=false"]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


def _workers(launcher_pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{launcher_pid}/task").glob("*/children"):
        kids += [int(p) for p in task.read_text().split()]
    return [k for k in kids if b"s3dist.train" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 300) -> str:
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest.exists():
            return latest.read_text().strip()
        if proc.poll() is not None:
            pytest.fail(f"job ended before its first checkpoint:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared in time")


@pytest.mark.slow
def test_sigkill_of_the_launcher_alone_ends_every_rank_and_resume_matches(tmp_path, reference_run):
    """SIGKILL of the `accelerate launch` process only (its workers sit in sessions of their own):
    both ranks are gone within 30 s, having published no further checkpoint (orphans would train on
    to step 60 in seconds), the newest checkpoint verifies, and `--resume auto` (which takes over
    the dead job's lock with a warning) logs the uninterrupted run's losses."""
    from s3dist.checkpoint import find_latest, read_meta

    out = tmp_path / "run"
    proc = launching.start(out, RUN)
    workers: list[int] = []
    try:
        killed_at = int(_wait_for_checkpoint(proc, out).split("-")[1])
        workers = _workers(proc.pid)
        ranks = [json.loads(ln) for ln in (out / "ranks.jsonl").read_text().splitlines()]
        assert sorted(workers) == sorted(r["pid"] for r in ranks) and len(workers) == 2
        assert all(os.getsid(w) != os.getsid(proc.pid) for w in workers)
        proc.kill()
        proc.wait(timeout=30)
        assert _wait_gone(workers, 30) == [], "ranks outlived their launcher"
    finally:
        proc.kill()
        _kill_exactly(workers)
    ckpt = find_latest(out)
    read_meta(ckpt)  # complete: every file matches its recorded sha256
    step = read_meta(ckpt, verify=False)["state"]["global_step"]
    assert step <= killed_at + 10, f"checkpoint of step {step} published after the launcher died at {killed_at}"
    p = launching.run_forked(out, RUN, extra=["--resume", "auto"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"took over the lock of host {HOST}" in p.stdout + p.stderr
    ref, got = _losses(reference_run), _losses(out)
    assert ref.keys() == got.keys()
    for s in ref:
        if s > step:
            assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])
    assert not (out / runlock.LOCK_FILE).exists()


@pytest.mark.slow
def test_second_job_on_a_held_run_dir_is_refused_before_writing(tmp_path):
    """While a job trains, a second job on its directory (`--resume auto` with the same command, what a
    double submission does: its config passes the resume check, so only the lock can stop it) exits non-zero
    naming the holder's host and pid, and writes nothing: config.yaml, ranks.jsonl and metrics.jsonl are the
    first job's, which trains on."""
    out = tmp_path / "run"
    first = launching.start(out, TINY + ["stages.specialize_steps=100000", "checkpoint.every_steps=5",
                                         "eval.run_at_end=false", "dist.ep_size=2"])
    workers: list[int] = []
    try:
        _wait_for_checkpoint(first, out)
        workers = _workers(first.pid)
        holder = json.loads((out / runlock.LOCK_FILE).read_text())
        rank0 = [json.loads(ln) for ln in (out / "ranks.jsonl").read_text().splitlines() if '"rank": 0' in ln][0]
        assert holder["pid"] == rank0["pid"] and holder["host"] == HOST
        config, ranks = (out / "config.yaml").read_bytes(), (out / "ranks.jsonl").read_bytes()
        metrics = (out / "metrics.jsonl").read_bytes()
        second = launching.run_forked(out, TINY + ["dist.ep_size=2"], extra=["--resume", "auto"])
        log = second.stdout + second.stderr
        assert second.returncode != 0, log[-3000:]
        assert f"is in use by another job: host {HOST}, pid {rank0['pid']}" in log, log[-3000:]
        assert (out / "config.yaml").read_bytes() == config
        assert (out / "ranks.jsonl").read_bytes() == ranks
        assert (out / "metrics.jsonl").read_bytes().startswith(metrics)  # not truncated to a checkpoint
        assert first.poll() is None, "the first job must train on"
        assert json.loads((out / runlock.LOCK_FILE).read_text())["token"] == holder["token"]
    finally:
        first.kill()
        _kill_exactly(workers)
        first.wait(timeout=30)


@pytest.mark.slow
def test_eval_into_a_run_directory_a_job_holds_is_refused(tmp_path, reference_run):
    """`s3dist eval --run RUN` writes eval.json into the run directory, so it takes the run's lock as a training
    job does: while another job holds it, the evaluation exits 2 naming that job and the way round (--out), and
    writes nothing there. Once the directory is free, the same command evaluates and leaves no lock behind."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = (run / "eval.json").read_bytes()
    argv = ["eval", "--run", run, "--keep-fraction", "0.3"]
    holder = _holder(run)
    try:
        p = run_main("s3dist.cli", argv, world=1)
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"is in use by another job: host {HOST}, pid {holder.pid}" in p.stderr and "--out DIR" in p.stderr
    assert "Traceback" not in p.stderr and (run / "eval.json").read_bytes() == before
    p = run_main("s3dist.cli", argv, world=1)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["step"] > 0 and not (run / runlock.LOCK_FILE).exists()


@pytest.mark.slow
def test_run_takes_over_a_stale_lock_with_a_warning(tmp_path):
    """A run directory whose lock names another host with a heartbeat older than
    checkpoint.lock_stale_s (a node that died): a new run takes it over, warns naming it, trains,
    and releases the lock at the end."""
    out = tmp_path / "run"
    _plant(out, _record(host="node-dead", pid=31337, heartbeat=time.time() - 120))
    p = run_main("s3dist.train", ["--output_dir", out, *TINY, "stages.specialize_steps=5", "stages.select_steps=0",
                                  "eval.run_at_end=false", "checkpoint.lock_stale_s=60"], world=1)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "took over the lock of host node-dead, pid 31337" in p.stderr
    assert "heartbeat is older than 60 s" in p.stderr
    assert (out / "metrics.jsonl").exists() and not (out / runlock.LOCK_FILE).exists()
