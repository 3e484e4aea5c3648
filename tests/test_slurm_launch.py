"""s3dist.launch and slurm/ without a cluster (fast): the requeue exit code survives the launcher, and the
shell scripts parse and quote correctly (tests/test_slurm.py runs them on a real 2-node cluster)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from s3dist import launch

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "my run $(touch /tmp/pwned) `touch /tmp/pwned` ; rm -rf x 'q\" * %j"


def test_launcher_passes_requeue_exit_code_through_torchrun(tmp_path):
    """A worker exiting 75 makes torchrun raise a generic failure; s3dist.launch returns 75."""
    (tmp_path / "requeue_prog.py").write_text("import sys; sys.exit(75)\n")
    proc = subprocess.run([sys.executable, "-m", "s3dist.launch", "--config_file",
                           str(ROOT / "launch_configs" / "cpu_2proc.yaml"), "--main_process_port", "0",
                           "-m", "requeue_prog"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == launch.EXIT_REQUEUE, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", sorted((ROOT / "slurm").glob("*")), ids=lambda p: p.name)
def test_slurm_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_find_output_dir_reads_every_spelling_verbatim():
    def find(*args):
        return subprocess.run(["bash", "-c", 'source "$0"; s3dist_find_output_dir "$@"',
                               str(ROOT / "slurm" / "common.sh"), *args], capture_output=True, text=True,
                              env={"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "", "PATH": "/usr/bin:/bin"}).stdout
    assert find("a=1", "--output_dir", HOSTILE, "b=2") == HOSTILE
    assert find(f"--output_dir={HOSTILE}") == HOSTILE
    assert find(f"output_dir={HOSTILE}") == HOSTILE
    assert find(f"--output-dir={HOSTILE}", "output_dir=other") == HOSTILE  # the flag beats the override
    assert find("a=1") == ""
    assert not Path("/tmp/pwned").exists() or pytest.fail("a hostile value was executed")


def test_a_requeued_job_resumes_from_the_newest_checkpoint_whatever_the_submission_resumed(tmp_path):
    """A job submitted with `--resume PATH` and requeued (SLURM_RESTART_COUNT > 0) must continue from the newest
    checkpoint, not go back to PATH on every restart and redo the work since: the `--resume auto` the job adds
    is the one training reads."""
    from s3dist.train import parse_args

    script = ('source "$0"; s3dist_srun() { shift 2; printf "%s\\n" "$@" > "$ARGS_OUT"; }; '
              's3dist_train_job "$@"')
    run_dir = tmp_path / "run"
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_RESTART_COUNT": "2", "PATH": "/usr/bin:/bin",
           "ARGS_OUT": str(tmp_path / "args")}
    p = subprocess.run(["bash", "-c", script, str(ROOT / "slurm" / "common.sh"), "--output_dir", str(run_dir),
                        "--resume", f"{run_dir}/checkpoints/step-00000002-specialize", "seed=3"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    argv = (tmp_path / "args").read_text().splitlines()
    args, cfg = parse_args(argv)
    assert cfg.resume == "auto" and cfg.seed == 3 and cfg.output_dir == str(run_dir), argv


def test_the_job_environment_is_checked_by_name():
    """Outside a SLURM job, or with a process count that is not a whole number >= 1, the scripts stop with a
    line naming the variable, not an 'unbound variable' or an AssertionError deep in the launcher."""
    def source(env):
        return subprocess.run(["bash", "-c", 'set -euo pipefail; source "$0"; echo sourced',
                               str(ROOT / "slurm" / "common.sh")], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", **env}, timeout=60)

    p = source({})
    assert p.returncode == 2 and "SLURM_JOB_ID is not set: this is a batch script, submit it with sbatch" in p.stderr
    for bad in ("0", "abc", "-1"):
        p = source({"SLURM_JOB_ID": "7", "S3DIST_PROCS_PER_NODE": bad})
        assert p.returncode == 2 and f"S3DIST_PROCS_PER_NODE='{bad}' must be a whole number >= 1" in p.stderr, p.stderr
    assert source({"SLURM_JOB_ID": "7", "S3DIST_PROCS_PER_NODE": "2"}).stdout == "sourced\n"
