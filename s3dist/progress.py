"""Rank-0 progress bar (stage, step / total, samples/s, ETA, loss); silent when not on a terminal,
so SLURM logs stay clean."""

from __future__ import annotations

import time

import torch


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self._last_loss_read = float("-inf")

    def start(self, stage: str, total: int, done: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=stage, unit="step", dynamic_ncols=True)
            self._last_loss_read = float("-inf")
            self._samples = 0
            self._t0 = time.monotonic()

    def update(self, step: int, loss, samples: int = 0) -> None:
        """`samples`: samples this step consumed over all ranks (for the samples/s readout)."""
        if self.bar is None:
            return
        self._samples += samples
        # Reading the loss waits for the device: do it only as often as the bar can redraw, and on
        # a detached value (the loss still holds the graph here).
        now = time.monotonic()
        if now - self._last_loss_read >= self.bar.mininterval or step >= (self.bar.total or 0):
            self._last_loss_read = now
            value = loss.detach().item() if torch.is_tensor(loss) else float(loss)
            rate = self._samples / max(now - self._t0, 1e-9)
            self.bar.set_postfix(loss=f"{value:.4f}", samples_per_s=f"{rate:.0f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
