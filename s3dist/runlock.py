"""One job per run directory: the run lock that rank 0 holds for the job's lifetime.

Two jobs writing one run directory corrupt it: both publish and rotate checkpoints, and a resume
picks a checkpoint that the other job deletes under it. So rank 0 takes the directory's lock
before anything is written, and the other ranks learn the outcome through the process group
(`acquire_collective`), so a refused job exits on every rank before touching the directory.

Files in the run directory:
    run.lock          JSON record of the holder: host, pid, user, SLURM job, start time, heartbeat.
                      Replaced atomically; rewritten every `stale_s / 10` by a heartbeat thread.
                      This is the truth across hosts (a shared file system may not honour flock
                      between hosts, it always shows every host the same file).
    .run.lock.flock   flock()ed by the holder while it lives. On the holder's host the kernel
                      releases it the moment the process dies, however it dies.

Who may take the directory (`judge`): nobody holds it; or the holder is an earlier run of the same
SLURM job (a requeue: same job id, higher restart count), even with a fresh heartbeat; or the
holder is dead: on this host its flock is free and its process is gone, on another host its
heartbeat is older than `stale_s` (clocks are assumed to agree to well within that: NTP). A dead
holder's lock is taken over with a warning; a live one's refused with a `RunLockError` naming it.

Creating the record uses link(2) (fails if the name exists; atomic on NFS too) and taking over
a dead holder's record renames it aside first (only one of two racing takers can), so two jobs
cannot both believe they took the lock. A holder whose record was taken over anyway (it stalled
for longer than `stale_s`) notices at its next heartbeat and exits instead of writing on.
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("s3dist")

LOCK_FILE = "run.lock"
FLOCK_FILE = ".run.lock.flock"
HEARTBEATS_PER_STALE = 10  # heartbeat every stale_s / 10: a live holder is never judged stale by lag
EXIT_LOCK_LOST = 3


class RunLockError(RuntimeError):
    """Another live job holds the run directory; the message names it (host, pid, start, job)."""


# --------------------------------------------------------------------------------------------
# Who we are, and whether a holder is alive
# --------------------------------------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return -1  # exists, unreadable
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces and ')'
    if fields[0] == "Z":
        return None  # a zombie holds no lock and writes nothing
    return int(fields[19])


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    cluster = os.environ.get("SLURM_CLUSTER_NAME")
    return f"{cluster}:{job}" if cluster else job


def identity(stale_s: float) -> dict:
    """The record this process writes when it holds a run directory."""
    now = time.time()
    pid = os.getpid()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"host": socket.gethostname(), "pid": pid, "user": user, "slurm_job": _slurm_job(),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "start": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)), "start_unix": now,
            "heartbeat": now, "heartbeat_every_s": stale_s / HEARTBEATS_PER_STALE,
            "token": uuid.uuid4().hex, "boot_id": _boot_id(), "proc_start": _process_start(pid)}


def holder_alive_here(rec: dict) -> bool:
    """Whether the holder's process (on this host) still runs: same pid, same start time, same boot."""
    if rec.get("boot_id") and _boot_id() and rec["boot_id"] != _boot_id():
        return False
    try:
        started = _process_start(int(rec["pid"]))
    except (KeyError, TypeError, ValueError):
        return False
    if started is None:
        return False
    return started == -1 or rec.get("proc_start") in (None, -1) or started == rec["proc_start"]


def describe(rec: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    parts = [f"host {rec.get('host', '?')}", f"pid {rec.get('pid', '?')}"]
    if rec.get("user"):
        parts.append(f"user {rec['user']}")
    if rec.get("start"):
        parts.append(f"started {rec['start']}")
    if rec.get("slurm_job"):
        parts.append(f"SLURM job {rec['slurm_job']} (restart {rec.get('slurm_restart', 0)})")
    if isinstance(rec.get("heartbeat"), (int, float)):
        parts.append(f"last heartbeat {max(0.0, now - rec['heartbeat']):.0f} s ago")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------


def judge(rec: dict | None, me: dict, *, flock_free: bool | None, now: float, stale_s: float,
          alive_here: Callable[[dict], bool] = holder_alive_here) -> tuple[str, str]:
    """('free' | 'takeover' | 'held', why). `rec`: the current record (None: none, {}: unreadable);
    `flock_free`: whether we got the flock (None: the file system does not support it)."""
    if rec is None:
        if flock_free is False:
            return "held", "its lock file is locked by a process that has not written its record yet"
        return "free", ""
    if not rec:
        if flock_free is False:
            return "held", "its lock file is locked and its record unreadable"
        return "takeover", "its record is unreadable and its lock file is not locked"
    if me["slurm_job"] and rec.get("slurm_job") == me["slurm_job"] and me["slurm_restart"] > int(
            rec.get("slurm_restart") or 0):
        return "takeover", f"it is this SLURM job's previous run (restart {rec.get('slurm_restart', 0)}): a requeue"
    if rec.get("host") == me["host"]:
        if flock_free is False or alive_here(rec):
            return "held", "its process is alive on this host"
        return "takeover", f"its process {rec.get('pid')} on this host is gone"
    beat = rec.get("heartbeat")
    limit = max(stale_s, 3 * float(rec.get("heartbeat_every_s") or 0))
    if not isinstance(beat, (int, float)) or now - beat > limit:
        return "takeover", f"its heartbeat is older than {limit:g} s (checkpoint.lock_stale_s): taken to be dead"
    return "held", f"its heartbeat is fresh (younger than {limit:g} s, checkpoint.lock_stale_s)"


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[str | None, dict | None]:
    """(raw text, record): (None, None) when there is no record, (text, {}) when it does not parse."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None, None
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError:
        return raw, {}
    return raw, rec if isinstance(rec, dict) else {}


def _write_tmp(path: Path, rec: dict) -> Path:
    tmp = path.with_name(f"{path.name}.{rec['token']}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(rec, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _create(path: Path, rec: dict) -> bool:
    """Publish `rec` at `path` only if no record is there. False when one is."""
    tmp = _write_tmp(path, rec)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:  # a file system without hard links: O_EXCL create, written in place
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, seen_raw: str, rec: dict) -> bool:
    """Replace the record we judged dead (`seen_raw`) by ours; False if it changed meanwhile."""
    aside = path.with_name(f"{path.name}.taken-{rec['token']}")
    try:
        os.rename(path, aside)  # of two racing takers, only one finds the record to move
    except FileNotFoundError:
        return False
    try:
        if aside.read_text() != seen_raw:  # the holder beat (or another taker won) in between: put it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            return False
        return _create(path, rec)
    finally:
        aside.unlink(missing_ok=True)


def _try_flock(fd: int) -> bool | None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            return None
        raise


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------


def _lost_lock_exit(lock: "RunLock", holder: dict | None) -> None:
    who = describe(holder) if holder else "nobody (its record is gone and could not be rewritten)"
    log.error("run lock of %s was taken over by %s while this job ran (it stalled for more than "
              "checkpoint.lock_stale_s?): exiting so two jobs do not write one run directory",
              lock.run_dir, who)
    os._exit(EXIT_LOCK_LOST)


@dataclass
class RunLock:
    run_dir: Path
    record: dict
    fd: int
    on_lost: Callable[["RunLock", dict | None], None] = _lost_lock_exit
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat_loop, name="s3dist-run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.record["heartbeat_every_s"]):
            try:
                if not self.beat():
                    return
            except OSError as e:  # a file-system hiccup: try again at the next beat
                log.warning("run lock heartbeat could not write %s: %s", self.path, e)

    def beat(self) -> bool:
        """Refresh the heartbeat. False (after calling `on_lost`) when another job owns the record now."""
        raw, cur = _read(self.path)
        if cur is None and _create(self.path, {**self.record, "heartbeat": time.time()}):
            log.warning("run lock record %s had disappeared; rewritten", self.path)
            return True
        if cur == {}:  # being written in place by a taker without hard links: look at the next beat
            return True
        if raw is None or cur.get("token") != self.record["token"]:
            _, cur = _read(self.path)
            self.on_lost(self, cur)
            return False
        self.record["heartbeat"] = time.time()
        os.replace(_write_tmp(self.path, self.record), self.path)
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        _, cur = _read(self.path)
        if cur and cur.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)
        try:
            os.close(self.fd)  # drops the flock
        except OSError:
            pass
        _HELD.pop(_key(self.run_dir), None)


_HELD: dict[str, RunLock] = {}  # locks this process holds, by resolved run directory


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def _still_ours(path: Path, rec: dict, settle_s: float) -> bool:
    # Three jobs racing for one dead holder's record across hosts can briefly both see their own
    # record written (one moves the other's aside, finds it is not the record it judged, and puts
    # it back): the loser finds out here, before it writes anything.
    time.sleep(settle_s)
    _, cur = _read(path)
    return bool(cur) and cur.get("token") == rec["token"]


def acquire(run_dir: Path, stale_s: float, *, heartbeat: bool = True, attempts: int = 20,
            settle_s: float = 0.2) -> RunLock:
    """Take the run directory's lock for this process, or raise RunLockError naming its live holder.

    Creates the directory (and the empty flock file) if needed, writes nothing else there unless it
    gets the lock. A dead holder's lock is taken over with a warning that names it and says why.
    """
    run_dir = Path(run_dir)
    stale = _HELD.get(_key(run_dir))
    if stale is not None:  # an earlier run() in this process raised before releasing it
        stale.release()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(run_dir / FLOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    me = identity(stale_s)
    flock_free: bool | None = False
    try:
        for attempt in range(attempts):
            if flock_free is False:
                flock_free = _try_flock(fd)
            raw, rec = _read(path)
            now = time.time()
            verdict, why = judge(rec, me, flock_free=flock_free, now=now, stale_s=stale_s)
            if verdict == "held":
                if not rec and attempt < attempts - 1:  # another job is between its flock and its record
                    time.sleep(0.1)
                    continue
                who = describe(rec, now) if rec else "an unknown process"
                raise RunLockError(
                    f"run directory '{run_dir}' is in use by another job: {who}; {why}. Two jobs must not "
                    f"write one run directory. Wait for that job to end or stop it, or use another "
                    f"--output_dir. If it is dead, its lock is taken over once its heartbeat is older than "
                    f"checkpoint.lock_stale_s={stale_s:g} s (at once on its own host); delete '{path}' by "
                    f"hand only if you are sure no job uses the directory")
            me["heartbeat"] = time.time()
            won = _create(path, me) if verdict == "free" else _take_over(path, raw, me)
            if won and _still_ours(path, me, settle_s):
                if verdict == "takeover":
                    log.warning("run directory %s: took over the lock of %s, because %s", run_dir,
                                describe(rec, now) if rec else "an unreadable record", why)
                break
            time.sleep(0.05)  # the record changed under us: look again
        else:
            raise RunLockError(f"run directory '{run_dir}': could not take its lock ({path}) in {attempts} "
                               f"attempts, the record kept changing: is another job starting in it?")
    except BaseException:
        os.close(fd)
        raise
    if flock_free is False:
        log.warning("run directory %s: the lock file %s is still locked by a process this host cannot "
                    "see (a stale lock on a network file system?); holding the directory by its record",
                    run_dir, run_dir / FLOCK_FILE)
    lock = RunLock(run_dir, me, fd)
    _HELD[_key(run_dir)] = lock
    if heartbeat:
        lock.start_heartbeat()
    return lock


def release(run_dir: Path) -> None:
    """Release this process's lock on `run_dir`, if it holds one (a no-op on ranks other than 0)."""
    lock = _HELD.get(_key(run_dir))
    if lock is not None:
        lock.release()


def release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


def acquire_collective(run_dir: Path, stale_s: float, is_main: bool) -> None:
    """Rank 0 takes the lock; every rank raises the same RunLockError if it could not, together."""
    import torch.distributed as dist

    outcome: list[str | None] = [None]
    error: BaseException | None = None
    if is_main:
        try:
            acquire(run_dir, stale_s)
        except RunLockError as e:
            outcome, error = [str(e)], e
        except Exception as e:  # e.g. the directory cannot be created: the other ranks must not hang
            outcome, error = [f"rank 0 could not lock run directory '{run_dir}': {e!r}"], e
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RunLockError(outcome[0])
