"""Several runs of one setting (seeds) as one sparsity curve: the mean and spread of their evaluations.

Nothing is evaluated again: each run's `eval.json` is read, and only the keep fractions every run
evaluated are kept. `s3dist sweep --run A B ...` writes the result (`sweep_seeds.json` / `.png`).
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from s3dist import plots, rundir

log = logging.getLogger("s3dist")


# Keys that runs meant as seeds of one setting may differ in (where they ran, and how).
SEED_RUN_KEYS = ("seed", "name", "output_dir", "resume", "overwrite", "logging.", "checkpoint.", "dist.", "data.path",
                 "data.prefetch", "data.read_threads", "data.eval_batch_size")


def settings_that_differ(runs: list[Path]) -> dict[str, list]:
    """{dotted key: each run's value} for the config keys, other than SEED_RUN_KEYS, on which the runs'
    config.yaml disagree (a run without a readable one is left out: the comparison only feeds a warning)."""
    import yaml

    from s3dist.config import ConfigError, flatten, from_dict, to_dict

    configs = []
    for r in runs:
        try:
            cfg = from_dict(yaml.safe_load(rundir.config_path(r).read_text()))
        except (OSError, yaml.YAMLError, ConfigError, TypeError):
            continue
        configs.append(flatten(to_dict(cfg)))
    keys = sorted({k for c in configs for k in c if not k.startswith(SEED_RUN_KEYS)})
    return {k: [c.get(k) for c in configs] for k in keys if len({repr(c.get(k)) for c in configs}) > 1}


def aggregate_seeds(runs: list[Path], out_dir: Path) -> dict:
    """Mean and std per keep fraction over several runs' eval.json (e.g. seeds): nothing is evaluated again, and
    only the keep fractions every run evaluated are kept. Warns when the runs differ in more than their seed."""
    from s3dist.data import DataError

    tables = []
    for r in runs:
        f = r / "eval.json"
        if not f.exists():
            raise DataError(f"'{f}' is missing: evaluate that run first (s3dist sweep --run {r})")
        tables.append({row["keep_fraction"]: row["accuracy"] for row in json.loads(f.read_text())["sweep"]})
    differ = settings_that_differ(runs)
    if differ:
        log.warning("these runs differ in more than their seed, so the mean is over different settings: %s",
                    "; ".join(f"{k} = {', '.join(map(repr, v))}" for k, v in differ.items()))
    common = sorted(set.intersection(*(set(t) for t in tables)))
    rows = [{"keep_fraction": p, "accuracy": statistics.mean(t[p] for t in tables),
             "std": statistics.pstdev([t[p] for t in tables]), "n": len(tables)} for p in common]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep_seeds.json").write_text(json.dumps({"runs": [str(r) for r in runs], "sweep": rows}, indent=1))
    plots.plot_sweep({"mean over runs": rows}, out_dir / "sweep_seeds.png", std={"mean over runs": [r["std"] for r in rows]})
    return {"sweep": rows}
