"""Rank-0 progress bar (stage, step / total, samples/s, ETA, loss); silent when not on a terminal,
so SLURM logs stay clean."""

from __future__ import annotations


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def start(self, stage: str, total: int, done: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=stage, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
