"""Watching a run: global expert load, the imbalance alarm, the progress bar, and TensorBoard.

* 2 real gloo ranks where rank 1's router sends every token to one expert: the loads that
  `moe_load_metrics` reports are the global counts (both ranks), computed here independently.
* A real training run, then a real `tensorboard` server on a loopback port, read over its HTTP data
  API: every `expert_load/{modality}/layer{L}/expert{E}` tag exists and sums to 1 at every step.
* `ImbalanceAlarm` warns once, after K intervals above the threshold, naming what is hot.
* The progress bar stays off when stdout is not a terminal (and shows on one).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from s3dist.dist import free_port as _free_port
from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[1]

# A real but tiny run: 2 modalities x 4 experts, 2 MoE layers, a log row every 4 steps.
TINY_RUN = ["data.synth.num_train=256", "data.synth.num_val=64", "data.synth.num_test=64",
            "data.synth.modality_dims=12,8", "data.synth.seq_len=8", "data.batch_size=32",
            "model.d_model=16", "model.num_layers=2", "moe.num_experts=4", "moe.expert_hidden=16",
            "logging.every_steps=4", "checkpoint.every_steps=0", "stages.specialize_steps=12",
            "stages.select_steps=4", "eval.run_at_end=false"]


def _train_cmd(out: Path, extra: list[str] = ()) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    return [sys.executable, "-m", "s3dist.train", "--output_dir", str(out), *TINY_RUN, *extra], env


# --------------------------------------------------------------------------------------------
# Global load over 2 ranks
# --------------------------------------------------------------------------------------------

MODS = {"text": 5, "audio": 3}
B, T, N, HOT = 4, 6, 4, 2  # rank 1 routes every token's top-1 to expert HOT


def _forced_routing(rank, world, out_dir):
    """3 training forwards per rank (rank 1's routers forced), then one `moe_load_metrics` call.

    Each rank records its own routing independently of the router's counters: the softmax top-k of
    the logits the router computed, over the tokens the input masks mark valid.
    """
    import torch.distributed as dist

    from s3dist.config import RunConfig
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.metrics import moe_load_metrics
    from s3dist.model.encoder import S3Encoder

    cfg = RunConfig()
    cfg.model.d_model, cfg.model.num_layers = 16, 2
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden = N, 2, 8
    dims = make_dims(*init_distributed(cfg.dist), 2)
    torch.manual_seed(0)
    model = S3Encoder(MODS, cfg.model, cfg.moe, ep_size=2, ep_rank=dims.ep_rank)
    attach_expert_groups(model, dims)
    model.train()

    seen = {}  # (layer, modality) -> logits of every call, in call order
    for li, layer in enumerate(model.layers):
        for router in layer.routers:
            real = router.logits

            def logits(tokens, ix, real=real, li=li):
                out = real(tokens, ix)
                if rank == 1:  # every token: top-1 HOT, top-2 the next expert
                    out = torch.zeros_like(out)
                    out[:, HOT] = 10.0
                    out[:, (HOT + 1) % N] = 5.0
                for m, part in zip(ix.modalities, out.split(ix.sizes)):
                    seen.setdefault((li, m), []).append(part.detach())
                return out

            router.logits = logits

    g = torch.Generator().manual_seed(100 + rank)
    masks_per_call = []
    for _ in range(3):
        feats = {m: torch.randn(B, T, d, generator=g) for m, d in MODS.items()}
        masks = {m: torch.rand(B, T, generator=g) > 0.25 for m in MODS}  # padding never counts as load
        masks_per_call.append(masks)
        model(feats, masks)

    demand = {}
    for (li, m), calls in seen.items():
        counts = torch.zeros(N, dtype=torch.long)
        for logit, masks in zip(calls, masks_per_call):
            top = logit.softmax(-1).topk(2, dim=-1).indices[masks[m].reshape(-1)]
            counts += torch.bincount(top.reshape(-1), minlength=N)
        demand[f"{m}/layer{li}"] = counts

    reduces = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (reduces.append(1), real_all_reduce(*a, **k))[1]
    try:
        scalars, hists = moe_load_metrics(model)
    finally:
        dist.all_reduce = real_all_reduce
    return {"demand": demand, "scalars": scalars, "hists": hists, "reduces": len(reduces)}


@pytest.mark.slow
def test_expert_load_is_global_over_ranks(tmp_path):
    """With rank 1 sending all its tokens to expert HOT, every rank's `moe_load_metrics` reports
    exactly the sum of both ranks' routed token-slots (not rank 0's own), from a single all-reduce
    per log interval, with the fractions summing to 1."""
    res = run_ranks(_forced_routing, 2, tmp_path)
    r0, r1 = res
    assert set(r0["demand"]) == {f"{m}/layer{li}" for m in MODS for li in range(2)}
    for key, local0 in r0["demand"].items():
        local1 = r1["demand"][key]
        assert local1[HOT] == local1.sum() // 2 > 0  # the forcing worked: top-1 of every token on rank 1
        expected = (local0 + local1).numpy().astype(np.float64)
        for r in res:
            np.testing.assert_array_equal(r["hists"][f"expert_tokens_before_capacity/{key}"], expected)
            loads = np.array([r["scalars"][f"expert_load/{key}/expert{e}"] for e in range(N)])
            np.testing.assert_array_equal(loads, expected / expected.sum())
            assert abs(loads.sum() - 1.0) < 1e-12
            mean = loads.mean()
            assert r["scalars"][f"expert_balance/{key}/max_over_mean"] == loads.max() / mean
        # The check can tell: rank 0's own share of HOT is not what was logged.
        own = local0.numpy() / local0.sum().item()
        assert own[HOT] != pytest.approx(r0["scalars"][f"expert_load/{key}/expert{HOT}"], abs=1e-3)
        # Rank 1 over-fills HOT beyond capacity, so some routes are dropped globally.
        assert 0 < r0["scalars"][f"expert_balance/{key}/dropped_fraction"] < 1
    assert r0["reduces"] == 1 and r1["reduces"] == 1, "counters must be reduced once per log interval"


# --------------------------------------------------------------------------------------------
# Imbalance alarm (single process, real S3Router counters)
# --------------------------------------------------------------------------------------------


def _router_with_demand(demand: dict[str, list[float]]):
    """An encoder-shaped object with one real S3Router whose counters hold `demand` per modality."""
    from s3dist.model.router import S3Router

    mods = list(demand)
    router = S3Router(8, mods, 4, 2, shared_experts=False, capacity_factor=1.25, eval_capacity_factor=2.0,
                      min_capacity=1, drop_tokens=True)
    d = torch.tensor([x for m in mods for x in demand[m]], dtype=torch.float32)
    router._counters += torch.cat([d, d, torch.zeros(len(mods)), torch.full((len(mods),), 10.0)])
    return SimpleNamespace(layers=[SimpleNamespace(routers=[router], groups=[mods])])


BALANCED = [10, 10, 10, 10]
SKEWED = [2, 3, 40, 3]  # expert2 holds 40/48: max/mean = 3.33


def _interval(alarm, text_demand):
    from s3dist.metrics import moe_load_metrics

    scalars, _ = moe_load_metrics(_router_with_demand({"text": text_demand, "audio": BALANCED}), reduce=False)
    return alarm.update(scalars)


def test_imbalance_alarm_warns_once_after_k_intervals(caplog):
    """max/mean above the threshold for K=3 consecutive intervals: nothing at 1 and 2, one warning
    at 3 naming modality, layer and the hottest experts (hottest first), then silence."""
    from s3dist.metrics import ImbalanceAlarm

    alarm = ImbalanceAlarm(threshold=3.0, patience=3)
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        assert _interval(alarm, SKEWED) == []
        assert _interval(alarm, SKEWED) == []
        assert caplog.records == []
        msgs = _interval(alarm, SKEWED)
        assert len(msgs) == 1
        msg = msgs[0]
        assert "'text'" in msg and "layer0" in msg and "audio" not in msg
        assert "hottest experts: expert2 (83.3%)" in msg
        assert "3.33 > 3.0" in msg and "3 log intervals" in msg
        for _ in range(3):
            assert _interval(alarm, SKEWED) == []
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [msg]


def test_imbalance_alarm_needs_consecutive_intervals(caplog):
    """A balanced interval resets the streak: above, above, below, above, above (K=3) never warns;
    a load exactly at the threshold does not count as above."""
    from s3dist.metrics import ImbalanceAlarm

    alarm = ImbalanceAlarm(threshold=3.0, patience=3)
    at_threshold = [1, 1, 6, 0]  # max/mean = 6 / 2 = 3.0 exactly
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        for demand in (SKEWED, SKEWED, BALANCED, SKEWED, SKEWED, at_threshold, SKEWED, SKEWED):
            assert _interval(alarm, demand) == []
    assert caplog.records == []


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------


def test_progress_disabled_writes_nothing(capsys):
    """A disabled `Progress` (not a terminal, or logging.progress=false) creates no bar and prints
    nothing through a whole stage; an enabled one draws stage, step / total and the loss."""
    from s3dist.progress import Progress

    off = Progress(enabled=False)
    off.start("specialize", total=10, done=0)
    for step in range(1, 11):
        off.update(step, torch.tensor(1.5))
    off.close()
    assert off.bar is None
    assert capsys.readouterr() == ("", "")

    on = Progress(enabled=True)
    on.start("specialize", total=10, done=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loss that still holds its graph is read without a warning
        on.update(5, torch.tensor(1.25, requires_grad=True) * 1.0)
    on.bar.refresh()
    on.close()
    err = capsys.readouterr().err
    assert "specialize" in err and "5/10" in err and "loss=1.2500" in err


class _CountingLoss:
    reads = 0

    def __float__(self):
        _CountingLoss.reads += 1
        return 0.5


def test_progress_reads_the_loss_only_when_the_bar_can_redraw(capsys):
    """The bar reads the loss (a device sync on GPU) at most once per redraw interval, plus the
    last step, not on every optimizer step."""
    from s3dist.progress import Progress

    on = Progress(enabled=True)
    on.start("select", total=200, done=0)
    on.bar.mininterval = 3600.0
    for step in range(1, 201):
        on.update(step, _CountingLoss())
    on.close()
    assert _CountingLoss.reads == 2  # the first step and the last
    assert "200/200" in capsys.readouterr().err


def _bar_drawn(text: str) -> bool:
    """tqdm's bar: `specialize:  50%|#####     | 2/4 [00:01<00:01, 1.9step/s, loss=...]`."""
    return re.search(r"\d+%\|.*\| \d+/\d+ \[", text) is not None


@pytest.mark.slow
def test_progress_bar_on_a_terminal(tmp_path):
    """`python -m s3dist.train` with stdout on a (120-column) pseudo-terminal draws the bar with the
    stage, step / total and the loss. (The piped case, as under SLURM, is checked in the TensorBoard
    test, whose training run has stdout and stderr on pipes.)"""
    cmd, env = _train_cmd(tmp_path / "tty", ["stages.run=specialize", "stages.specialize_steps=4"])
    primary, secondary = pty.openpty()
    # A new pty is 0x0; a real terminal has a size, and tqdm draws nothing into 0 columns.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []

    def drain():  # a pty's buffer is small: read it while the child runs, until EOF/EIO
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert p.wait(timeout=240) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        reader.join(timeout=10)
        os.close(primary)
    text = b"".join(chunks).decode(errors="replace")
    assert _bar_drawn(text) and "specialize" in text and "4/4" in text and "loss=" in text, text[-3000:]
    assert "requires_grad" not in text, text[-3000:]  # the bar reads the loss without a warning


# --------------------------------------------------------------------------------------------
# A real TensorBoard server
# --------------------------------------------------------------------------------------------


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:  # loopback only
        return json.loads(r.read())


@pytest.fixture
def tensorboard_server(tmp_path):
    """Start `tensorboard --logdir <dir>` on a free 127.0.0.1 port; always stopped afterwards
    (its own process group, so its data-server child goes with it)."""
    procs = []

    def start(logdir: Path) -> str:
        port = _free_port()
        exe = Path(sys.executable).with_name("tensorboard")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from tensorboard.main import run_main; run_main()"]
        log_path = tmp_path / "tensorboard.log"
        with open(log_path, "w") as log_file:
            p = subprocess.Popen(cmd + ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
                                        "--reload_interval", "1"],
                                 stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        procs.append((p, log_path))
        return f"http://127.0.0.1:{port}"

    yield start
    for p, _ in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _scalars(base: str, tag: str) -> list[list[float]]:
    q = urllib.parse.urlencode({"run": ".", "tag": tag})
    return _get_json(f"{base}/data/plugin/scalars/scalars?{q}")  # [[wall_time, step, value], ...]


def _wait_for_series(base: str, want: set[str], steps: int, proc_log: Path, deadline_s: float = 60.0):
    """Poll the scalars plugin (bounded) until every wanted tag is served with all `steps` points;
    the server loads event files in the background, so tags and points appear over time.
    Returns (all scalar tags, {tag: points})."""
    deadline = time.monotonic() + deadline_s
    series, last = {}, "not listening"
    while time.monotonic() < deadline:
        try:
            tags = _get_json(f"{base}/data/plugin/scalars/tags").get(".", {})
            for tag in sorted(want & tags.keys() - series.keys()):
                points = _scalars(base, tag)
                if len(points) == steps:
                    series[tag] = points
            if len(series) == len(want):
                return tags, series
            last = f"{len(series)}/{len(want)} complete series"
        except OSError as e:  # not listening yet
            last = repr(e)
        time.sleep(0.25)
    raise AssertionError(f"tensorboard did not serve the expert-load series in {deadline_s}s ({last}); "
                         f"its log:\n{proc_log.read_text()[-2000:]}")


@pytest.mark.slow
def test_tensorboard_server_shows_expert_load(tmp_path, tensorboard_server):
    """A real run's TB logs, read back through a real `tensorboard` server's HTTP data API: an
    `expert_load/{m}/layer{L}/expert{E}` series for every modality, layer and expert, the E series
    of one (m, L) sum to 1 at every logged step, and they equal the rows of metrics.jsonl."""
    out = tmp_path / "run"
    cmd, env = _train_cmd(out)
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not _bar_drawn(p.stdout) and not _bar_drawn(p.stderr), "progress bar drawn with stdout on a pipe"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    mods, layers, experts = cfg["data"]["modalities"], cfg["model"]["num_layers"], cfg["moe"]["num_experts"]
    assert len(mods) == 2 and layers == 2 and experts == 4
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    rows = {r["step"]: r for r in rows if r["stage"] in ("specialize", "select")}
    assert sorted(rows) == [4, 8, 12, 16]

    want = {f"expert_load/{m}/layer{li}/expert{e}" for m in mods for li in range(layers) for e in range(experts)}
    base = tensorboard_server(out / "tb")
    tags, series = _wait_for_series(base, want, len(rows), tmp_path / "tensorboard.log")
    assert {t for t in tags if t.startswith("expert_load/")} == want
    assert {f"expert_balance/{m}/layer{li}/max_over_mean" for m in mods for li in range(layers)} <= tags.keys()

    for m in mods:
        for li in range(layers):
            per_step: dict[int, list[float]] = {}
            for e in range(experts):
                tag = f"expert_load/{m}/layer{li}/expert{e}"
                for _wall, step, value in series[tag]:
                    per_step.setdefault(step, []).append(value)
                    assert value == pytest.approx(rows[step][tag], abs=1e-6)  # TB stores float32
            assert sorted(per_step) == sorted(rows)
            for step, values in per_step.items():
                assert len(values) == experts
                assert sum(values) == pytest.approx(1.0, abs=1e-5), (m, li, step, values)


def test_imbalance_alarm_state_carries_a_streak_and_a_warning_across_a_resume(caplog):
    """The alarm's state goes into the checkpoint: a streak under way continues after a resume (patience 3:
    2 intervals before, 1 after warns), and a layer already warned about is not warned about again."""
    from s3dist.metrics import ImbalanceAlarm

    before = ImbalanceAlarm(threshold=3.0, patience=3)
    assert _interval(before, SKEWED) == [] and _interval(before, SKEWED) == []
    resumed = ImbalanceAlarm(threshold=3.0, patience=3)
    resumed.load_state_dict(before.state_dict())
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        assert len(_interval(resumed, SKEWED)) == 1
    again = ImbalanceAlarm(threshold=3.0, patience=3)
    again.load_state_dict(resumed.state_dict())
    assert all(_interval(again, SKEWED) == [] for _ in range(4))
