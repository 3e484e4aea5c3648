"""Dropless vs capacity drops: one training step's time and dropped fraction on a trained run's routers.

    .venv/bin/python scripts/dropless_speed.py runs/balance/aux_loss-s0 [--reps 20] [--batch 64]

The experiment's samples/s column comes from separate 2-process runs on a shared machine, so its spread is
the machine's load as much as the setting's. Here both settings run in ONE process on the same batches,
interleaved (drop, dropless, dropless, drop, ...), so load drift hits both alike and the ratio is a same-run
ratio. The step is Stage 1's (two augmented views in one MoE call, forward + backward, no optimizer
update) on the run's newest checkpoint (the end of Stage 2: routers more uneven than in Stage 1), ep_size=1
on one process: no all-to-all, so this measures the router's and the experts' work on the capacity-sized
buffers, not the communication a larger dropless buffer would also cost across ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    from s3dist.config import load_config
    from s3dist.data.stream import ShardStream
    from s3dist.objectives import specialize_loss
    from s3dist.pretrained import S3Encoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = S3Encoder.from_run(args.run)
    cfg = load_config(str(args.run / "config.yaml"), [])
    routers = model.routers()
    batches = []
    for b in ShardStream(str(args.run / "data"), "train", batch_size=args.batch, shuffle_buffer=0, prefetch=0):
        batches.append(b)
        if len(batches) == 4:
            break
    model.train()
    for r in routers:
        r.bias_updates = False  # a timing loop, not training: a bias run's bias must not move
    times: dict[bool, list[float]] = {True: [], False: []}
    counters: dict[bool, torch.Tensor] = {}
    for rep in range(args.reps + 1):
        order = (True, False) if rep % 2 == 0 else (False, True)
        for drop in order:
            for r in routers:
                r.drop_tokens = drop
                r.pop_load_counters()
            batch = batches[rep % len(batches)]
            t0 = time.perf_counter()
            loss, _ = specialize_loss(model, batch, cfg, model.modalities)
            loss.backward()
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if rep:  # the first repetition warms up
                times[drop].append(dt)
                c = torch.stack([torch.stack([r.pop_load_counters()[:2 * r.num_experts].view(2, -1).sum(1)])
                                 for r in routers]).sum(0).squeeze(0)
                counters[drop] = counters.get(drop, torch.zeros(2)) + c
    out = {}
    for drop in (True, False):
        demand, kept = counters[drop].tolist()
        out["drop" if drop else "dropless"] = {"median_ms": 1000 * statistics.median(times[drop]),
                                               "dropped_fraction": 1 - kept / demand}
    out["dropless_over_drop_time"] = out["dropless"]["median_ms"] / out["drop"]["median_ms"]
    out.update(run=str(args.run), reps=args.reps, batch=args.batch, torch=torch.__version__)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
