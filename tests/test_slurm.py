"""End to end on a real two-node SLURM cluster (tests/slurm_cluster.py): sbatch -> srun -> one
`accelerate launch` per node -> gloo across the two emulated nodes.

These need root and network namespaces; they install Debian's slurm-wlm / munge when missing
and are skipped only where the host forbids `ip netns add`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.slurm_cluster import SlurmCluster, ensure_slurm_installed, namespaces_forbidden_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PWNED = Path("/tmp/pwned")
HOSTILE_NAME = "my run $(touch /tmp/pwned) `touch /tmp/pwned`"
# `name` is a path component in s3dist (no '/' allowed); this one still holds a command substitution
HOSTILE_RUN_NAME = "evil run $(touch pwned-by-name) x"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}

# Small enough for ~1 minute on two 1-process CPU nodes, still every stage, a checkpoint and eval.
TRAIN_OVERRIDES = [
    "dist.ep_size=2", "data.synth.num_train=512", "data.synth.num_val=64", "data.synth.num_test=128",
    "stages.specialize_steps=30", "stages.select_steps=10", "checkpoint.every_steps=10",
    "logging.every_steps=5", "eval.keep_fractions=[0.3,1.0]", "eval.probe_Cs=[1.0]",
]


def _train_available() -> bool:
    return importlib.util.find_spec("s3dist.train") is not None


needs_train = pytest.mark.skipif(not _train_available(), reason="s3dist.train is not written yet")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = namespaces_forbidden_reason()
    if reason:
        pytest.skip(reason)
    seconds = ensure_slurm_installed()
    print(f"\nslurm packages ready after {seconds:.1f}s of apt-get")
    reason = namespaces_forbidden_reason()  # again: `ip` may only just have been installed
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _job_env(cluster: SlurmCluster, **extra) -> dict:
    return cluster.env(**{"S3DIST_ROOT": str(ROOT), "S3DIST_PYTHON": sys.executable, **extra})


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finish(cluster: SlurmCluster, job: int, timeout: float, logs: Path) -> dict:
    info = cluster.wait_state(job, TERMINAL, timeout)
    if info["JobState"] != "COMPLETED":
        dump = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.rglob("*.log*")))
        pytest.fail(f"job {job} ended {info['JobState']} ({info.get('ExitCode')})\n{dump}\n{cluster.logs()}")
    return info


# ---------------------------------------------------------------------------------------------
# The cluster and the launch path, with a stand-in program (no training code needed)
# ---------------------------------------------------------------------------------------------

STANDIN = """\
import json, os, socket, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
rec = dict(rank=dist.get_rank(), world=dist.get_world_size(), hostname=socket.gethostname(),
           node_rank=int(os.environ["GROUP_RANK"]), sum=t.item(), argv=sys.argv[1:])
with open(os.path.join(os.environ["STANDIN_OUT"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(rec, f)
dist.destroy_process_group()
"""

STANDIN_SBATCH = """\
#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
set -euo pipefail
source "$S3DIST_ROOT/slurm/common.sh"
s3dist_srun "$STANDIN_OUT/node%n.log" standin_allreduce "$@"
"""


def test_gloo_allreduce_across_two_nodes(cluster, tmp_path):
    """slurm/common.sh's srun -> s3dist.launch -> accelerate -> torchrun reaches a gloo all_reduce
    spanning both nodes (different host names), and a hostile argument arrives verbatim."""
    PWNED.unlink(missing_ok=True)
    (tmp_path / "standin_allreduce.py").write_text(STANDIN)
    (tmp_path / "standin.sbatch").write_text(STANDIN_SBATCH)
    job = cluster.sbatch(["standin.sbatch", HOSTILE_NAME, "k=v"], cwd=tmp_path,
                         env=_job_env(cluster, STANDIN_OUT=str(tmp_path)))
    _finish(cluster, job, 120, tmp_path)
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["sum"] for r in recs] == [3.0, 3.0]
    assert {r["world"] for r in recs} == {2}
    assert sorted(r["node_rank"] for r in recs) == [0, 1]
    assert {r["hostname"] for r in recs} == set(cluster.nodes)
    assert all(r["argv"] == [HOSTILE_NAME, "k=v"] for r in recs)
    assert not PWNED.exists()


RECORDER = """\
#!{python}
# stands in for python on the nodes: records what the per-node launch would have run
import json, os, sys
out = os.path.join(os.environ["RECORD_DIR"], "%s-node%s.json" % (os.environ["SLURM_JOB_ID"], os.environ["SLURM_NODEID"]))
json.dump(dict(argv=sys.argv[1:], node=os.environ["SLURMD_NODENAME"],
               array_task=os.environ.get("SLURM_ARRAY_TASK_ID")), open(out, "w"))
"""


def _recorder(tmp_path: Path) -> Path:
    recorder = tmp_path / "recorder"
    recorder.write_text(RECORDER.format(python=sys.executable))
    recorder.chmod(0o755)
    return recorder


def _recorded(tmp_path: Path, job: int) -> list[dict]:
    """What each node's launcher was given, in node order."""
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"{job}-node*.json"))]


def test_train_sbatch_passes_user_values_verbatim(cluster, tmp_path):
    """Run name / output dir / overrides with spaces, quotes and `$(...)`: slurm/train.sbatch hands
    them to each node's launcher as single arguments and nothing in them is executed."""
    PWNED.unlink(missing_ok=True)
    recorder = _recorder(tmp_path)
    out_dir = str(tmp_path / f"runs/{HOSTILE_NAME}")
    user_args = ["--output_dir", out_dir, f"name={HOSTILE_RUN_NAME}"]
    job = cluster.sbatch([f"--job-name={HOSTILE_NAME}", str(ROOT / "slurm" / "train.sbatch"), *user_args],
                         cwd=tmp_path, env=_job_env(cluster, S3DIST_PYTHON=str(recorder), RECORD_DIR=str(tmp_path)))
    _finish(cluster, job, 60, tmp_path)
    assert cluster.run_client(["squeue", "-h", "-t", "all", "-j", str(job), "-o", "%j"]).stdout.strip() == HOSTILE_NAME
    recs = _recorded(tmp_path, job)
    assert [r["node"] for r in recs] == cluster.nodes
    for rank, rec in enumerate(recs):
        argv = rec["argv"]
        assert argv[:4] == ["-m", "s3dist.launch", "--machine_rank", str(rank)]
        assert argv[argv.index("-m", 1):] == ["-m", "s3dist.train", *user_args]
    assert not PWNED.exists() and not (tmp_path / "pwned-by-name").exists()
    assert (Path(out_dir) / "logs" / f"job-{job}.log").is_file(), "the job log lives in the run directory"


def test_sweep_sbatch_gives_each_array_task_its_value(cluster, tmp_path):
    """slurm/sweep.sbatch: array task i trains with KEY=<i-th value> in its own run directory,
    user arguments passed through verbatim."""
    recorder = _recorder(tmp_path)
    env = _job_env(cluster, S3DIST_PYTHON=str(recorder), RECORD_DIR=str(tmp_path), S3DIST_SWEEP_KEY="stages.keep_fraction",
                   S3DIST_SWEEP_VALUES="0.1 0.3", S3DIST_SWEEP_DIR=str(tmp_path / "sweep"))
    array_job = cluster.sbatch(["--array=0-1", str(ROOT / "slurm" / "sweep.sbatch"), f"name={HOSTILE_RUN_NAME}"],
                               cwd=tmp_path, env=env)
    deadline = time.monotonic() + 90
    while cluster.run_client(["squeue", "-h", "-j", str(array_job), "-o", "%i"]).stdout.strip():
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.5)
    tasks = {0: [], 1: []}
    for p in sorted(tmp_path.glob("*-node*.json")):
        rec = json.loads(p.read_text())
        tasks[int(rec["array_task"])].append(rec)
    for task, value in ((0, "0.1"), (1, "0.3")):
        assert len(tasks[task]) == 2
        for rec in tasks[task]:
            argv = rec["argv"]
            assert argv[argv.index("-m", 1):] == ["-m", "s3dist.train", "--output_dir",
                                                  str(tmp_path / "sweep" / f"stages.keep_fraction-{value}"),
                                                  f"stages.keep_fraction={value}", f"name={HOSTILE_RUN_NAME}"]


def test_eval_sbatch_passes_arguments_verbatim(cluster, tmp_path):
    recorder = _recorder(tmp_path)
    args = ["eval", "--run", str(tmp_path / HOSTILE_NAME), "--keep-fraction", "0.3"]
    job = cluster.sbatch([str(ROOT / "slurm" / "eval.sbatch"), *args], cwd=tmp_path,
                         env=_job_env(cluster, S3DIST_PYTHON=str(recorder), RECORD_DIR=str(tmp_path)))
    _finish(cluster, job, 60, tmp_path)
    assert [r["argv"] for r in _recorded(tmp_path, job)] == [["-m", "s3dist.cli", *args]]
    assert not PWNED.exists()


# ---------------------------------------------------------------------------------------------
# The real training through slurm/train.sbatch
# ---------------------------------------------------------------------------------------------


def _submit_train(cluster: SlurmCluster, cwd: Path, run_dir: Path, extra: list[str] = ()) -> int:
    args = [str(ROOT / "slurm" / "train.sbatch"), "--output_dir", str(run_dir), *TRAIN_OVERRIDES, *extra]
    return cluster.sbatch(args, cwd=cwd, env=_job_env(cluster))


def _train_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows of training steps (eval / sweep rows carry no loss)."""
    return [m for m in _read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]


def _final_loss(run_dir: Path) -> tuple[int, float]:
    last = max(_train_records(run_dir), key=lambda r: r["step"])
    return last["step"], last["loss"]


INTERRUPT_AFTER_STEP = 15  # past the first checkpoint (every 10 steps), well before the end (40)


REQUEUE_GRACE_S = 3.0


@dataclass
class TrainJob:
    job: int
    run_dir: Path
    interrupt: str | None = None  # None, "usr2" or "requeue"
    interrupted_at: int | None = None
    info: dict = field(default_factory=dict)
    seconds: float = 0.0
    pending_since: float | None = None


def _drive(cluster: SlurmCluster, jobs: dict[str, TrainJob], timeout: float) -> None:
    """Follow all jobs at once: pre-empt each interruptible job once it has logged
    INTERRUPT_AFTER_STEP steps, release it when it waits requeued, stop when all have ended."""
    start = time.monotonic()
    while True:
        running = False
        for tj in jobs.values():
            if tj.info.get("JobState") in TERMINAL:
                continue
            tj.info = cluster.job(tj.job)
            if tj.info["JobState"] in TERMINAL:
                tj.seconds = time.monotonic() - start
                continue
            running = True
            if tj.interrupt and tj.interrupted_at is None:
                steps = max((m["step"] for m in _train_records(tj.run_dir)), default=0) \
                    if (tj.run_dir / "metrics.jsonl").is_file() else 0
                if steps >= INTERRUPT_AFTER_STEP:
                    tj.interrupted_at = steps
                    if tj.interrupt == "usr2":  # what `#SBATCH --signal=USR2@120` does before the time limit
                        cluster.run_client(["scancel", "--signal=USR2", str(tj.job)])
                    else:  # SIGTERM to every process of the job, then SLURM itself requeues
                        cluster.scontrol("requeue", str(tj.job))
            elif tj.interrupted_at is not None and tj.info["JobState"] == "PENDING" and tj.info["Restarts"] != "0":
                # Requeued jobs wait on BeginTime. Release them only after a grace period: slurmd
                # revokes the old run's credential with one-second resolution, and a relaunch inside
                # that second is killed as "Job credential revoked" (real requeues wait far longer).
                tj.pending_since = tj.pending_since or time.monotonic()
                if time.monotonic() - tj.pending_since >= REQUEUE_GRACE_S:
                    # it may have started meanwhile ("no longer pending")
                    cluster.scontrol("update", f"jobid={tj.job}", "StartTime=now", check=False)
        if not running:
            return
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"training jobs still running after {timeout}s: "
                               f"{ {k: v.info.get('JobState') for k, v in jobs.items()} }\n{cluster.logs()}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def train_jobs(cluster, tmp_path_factory) -> dict[str, TrainJob]:
    """Three 2-node training jobs run side by side (each takes one CPU per node): an uninterrupted
    reference (with a hostile run name), one pre-empted by USR2 and one by `scontrol requeue`.
    Side by side because the module has a time budget; the result must not depend on it."""
    if not _train_available():
        pytest.skip("s3dist.train is not written yet")
    jobs = {}
    for kind, extra in (("reference", [f"name={HOSTILE_RUN_NAME}"]),
                        ("usr2", ["eval.run_at_end=false"]), ("requeue", ["eval.run_at_end=false"])):
        base = tmp_path_factory.mktemp(f"train-{kind}")
        run_dir = base / f"{kind} run"
        jobs[kind] = TrainJob(_submit_train(cluster, base, run_dir, extra), run_dir,
                              interrupt=None if kind == "reference" else kind)
    _drive(cluster, jobs, timeout=420)
    print("\ntraining jobs took " + ", ".join(f"{k} {v.seconds:.0f}s" for k, v in jobs.items()))
    return jobs


def _assert_completed(cluster: SlurmCluster, tj: TrainJob) -> None:
    if tj.info.get("JobState") != "COMPLETED":
        dump = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(tj.run_dir.rglob("logs/*.log")))
        pytest.fail(f"job {tj.job} ended {tj.info.get('JobState')} ({tj.info.get('ExitCode')})\n{dump}\n"
                    f"{cluster.logs()}")


@needs_train
def test_train_sbatch_two_nodes_runs_to_completion(cluster, train_jobs, tmp_path):
    """sbatch slurm/train.sbatch, 2 nodes x 1 CPU process, ep_size=2: the run directory contract
    holds, the two ranks ran on different nodes, and a hostile run name arrived verbatim."""
    ref = train_jobs["reference"]
    _assert_completed(cluster, ref)
    run = ref.run_dir
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "ranks.jsonl"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir()) and any((run / "checkpoints").iterdir())
    metrics = _train_records(run)
    assert metrics and all({"step", "stage", "loss", "samples_per_s"} <= m.keys() for m in metrics)
    assert {m["stage"] for m in metrics} == {"specialize", "select"}
    ranks = _read_jsonl(run / "ranks.jsonl")
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert sorted(r["node_rank"] for r in ranks) == [0, 1]
    assert {r["hostname"] for r in ranks} == set(cluster.nodes), ranks
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == HOSTILE_RUN_NAME
    assert not (run.parent / "pwned-by-name").exists() and not PWNED.exists()
    assert len(list((run / "logs").glob("job-*-r0-node*.log"))) == 2


@needs_train
@pytest.mark.parametrize("how", ["usr2", "requeue"])
def test_preempted_job_requeues_and_matches_uninterrupted_loss(cluster, train_jobs, how):
    """Pre-emption mid-run (`scancel --signal=USR2`, as `--signal=USR2@120` does, or `scontrol
    requeue`, which sends SIGTERM): the job checkpoints, is requeued, resumes with --resume auto
    and ends with the same final loss as the uninterrupted reference run."""
    tj, ref = train_jobs[how], train_jobs["reference"]
    _assert_completed(cluster, ref)
    _assert_completed(cluster, tj)
    assert tj.interrupted_at is not None, "the job ended before it could be interrupted"
    assert int(tj.info["Restarts"]) == 1
    first = "\n".join(p.read_text(errors="replace") for p in (tj.run_dir / "logs").glob("job-*-r0-node*.log"))
    assert "pre-emption signal received: checkpoint written" in first
    assert len(list((tj.run_dir / "logs").glob("job-*-r1-node*.log"))) == 2, "a second attempt ran on both nodes"
    if how == "usr2":  # exit 75 came through s3dist.launch and srun, and the script requeued the job
        assert "requeueing job" in (tj.run_dir / "logs" / f"job-{tj.job}.log").read_text()
    step, loss = _final_loss(tj.run_dir)
    ref_step, ref_loss = _final_loss(ref.run_dir)
    assert step == ref_step and step > tj.interrupted_at
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
