"""A trained encoder outside its training job: export folder, `S3Encoder.from_pretrained` in a plain
process, `embed`, `s3dist embed` on 1 and 2 ranks, `s3dist eval --model FOLDER`, the README example.

The slow tests share the session's real 2-rank ep=2 `accelerate launch` run (`reference_run`, tests/conftest.py)
and its export; the fast ones build small untrained encoders in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import launching
from tests.launching import ROOT
from tests.multirank import run_main, run_ranks

# reference_run is tests/launching.py REFERENCE: its rows_per_shard=40 makes the test split 4 shards of 40, 40,
# 40, 8 rows (2 ranks get whole, uneven shards), the training split 13 shards (2 ranks get every other row): both
# ways ShardStream splits data across ranks.
P = 0.3  # a keep fraction the run's evaluation calibrated (TINY: eval.keep_fractions=0.3,1.0)


def _plain_env() -> dict:
    """The environment of a plain `python` process: no torchrun / accelerate variables."""
    env = launching.env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cli(*args) -> subprocess.CompletedProcess:
    """`s3dist ARGS` as one process (tests/multirank.py `run_main`)."""
    return run_main("s3dist.cli", list(args), world=1)


def _tiny_encoder(modalities: dict[str, int], seed: int = 0):
    from s3dist.config import load_config, to_dict
    from s3dist.pretrained import S3Encoder

    torch.manual_seed(seed)
    cfg = load_config(None, ["model.d_model=16", "model.num_heads=2", "moe.expert_hidden=8", f"moe.init_seed={seed}"])
    return S3Encoder(list(modalities), modalities, to_dict(cfg))


# ---------------------------------------------------------------------------------------------
# Fast: one process, untrained encoders
# ---------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    """save_pretrained -> from_pretrained gives the same weights, config (modality order included, though
    config.json sorts its keys), thresholds (+inf / -inf too) and embeddings; saving again writes the same
    config; a weight missing from model.safetensors fails the load instead of staying random."""
    from safetensors.torch import load_file, save_file

    from s3dist.pretrained import S3Encoder

    enc = _tiny_encoder({"zeta": 5, "alpha": 3}, seed=1)
    enc.stage3["thresholds"] = {"0.5": {"0": {"zeta": 0.3, "alpha": None}, "1": {"zeta": "-inf", "alpha": 0.45}}}
    enc.save_pretrained(tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "a").iterdir():  # meant to be shared: what the umask allows, not safetensors' owner-only
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name

    torch.manual_seed(2)  # another initialisation: everything must come from the folder
    back = S3Encoder.from_pretrained(tmp_path / "a")
    assert back.modalities == ["zeta", "alpha"]
    assert back.hub_config() == json.loads(json.dumps(enc.hub_config()))
    a, b = enc.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    g = torch.Generator().manual_seed(0)
    feats = {"zeta": torch.randn(6, 4, 5, generator=g), "alpha": torch.randn(6, 3, generator=g)}  # sequence, vector
    for p in (1.0, 0.5):
        want, got = enc.embed(feats, keep_fraction=p), back.embed(feats, keep_fraction=p)
        for key in ("zeta", "alpha", "fused"):
            torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
        torch.testing.assert_close(got["fused"], torch.cat([got["zeta"], got["alpha"]], 1), atol=0, rtol=0)
    assert not torch.equal(enc.embed(feats, keep_fraction=0.5)["fused"], enc.embed(feats)["fused"])

    back.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()

    weights = load_file(str(tmp_path / "a" / "model.safetensors"))
    dropped = next(k for k in weights if ".deepspeed_experts.3." in k)
    del weights[dropped]
    save_file(weights, str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(RuntimeError, match=re.escape(dropped)):
        S3Encoder.from_pretrained(tmp_path / "a")
    assert not torch.distributed.is_initialized()


def _data_with_shuffled_ids(root: Path) -> str:
    """A small data set whose ids are not in data order, with a sequence and a vector modality."""
    from s3dist.data.manifest import LabelSpec
    from s3dist.data.writer import SplitArrays, write_dataset

    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)

    def split(n, first):
        y = np.arange(n) % 2
        return SplitArrays(features={"seq": rng.normal(size=(n, 4, 5)).astype(np.float32) + y[:, None, None],
                                     "vec": rng.normal(size=(n, 3)).astype(np.float32) - y[:, None]},
                           labels=y.astype(np.int64), ids=ids[first:first + n])

    url = str(root / "shuffled")
    write_dataset(url, name="shuffled", splits={"train": split(40, 0), "val": split(10, 40), "test": split(23, 50)},
                  label=LabelSpec(kind="binary", num_classes=2), source="test", rows_per_shard=7)
    return url


def test_calibrate_embed_split_data_order_and_what_a_missing_p_needs(tmp_path):
    """Without thresholds for p, `embed` says how to get them; `calibrate` fixes them on the training split
    and save_pretrained keeps them. `embed_split` (1 process) writes the split in shard order - not sorted
    by id - with each row's own embedding."""
    import pyarrow.parquet as pq

    from s3dist.embed import embed_split
    from s3dist.pretrained import S3Encoder

    url = _data_with_shuffled_ids(tmp_path)
    enc = _tiny_encoder({"seq": 5, "vec": 3})
    with pytest.raises(ValueError, match=r"no calibrated Stage-3 thresholds for keep_fraction = 0.4.*"
                                         r"encoder.calibrate\(DATA_URL, 0.4\).*s3dist sweep --run RUN"):
        enc.embed({"seq": torch.zeros(1, 4, 5), "vec": torch.zeros(1, 3)}, keep_fraction=0.4)
    with pytest.raises(ValueError, match=r"features\['vec'\] has shape \(1, 4\); expected \[B, T, 3\]"):
        enc.embed({"seq": torch.zeros(1, 4, 5), "vec": torch.zeros(1, 4)})
    for p in (1.7, -3, 1.0):
        with pytest.raises(ValueError, match=rf"keep_fraction = {p} must be in \(0, 1\)"):
            enc.calibrate(url, p)
    fixed = enc.calibrate(url, 0.4, batch_size=8)
    assert set(fixed) == {0, 1} and all(set(per) == {"seq", "vec"} for per in fixed.values())
    enc.save_pretrained(tmp_path / "enc")
    back = S3Encoder.from_pretrained(tmp_path / "enc")
    assert back.calibrated_keep_fractions() == [0.4]

    out = embed_split(back, url, "test", tmp_path / "emb.parquet", keep_fraction=0.4, batch_size=4)
    table = pq.read_table(out)
    shard_ids = np.concatenate([pq.read_table(f"{url}/{f}", columns=["id"])["id"].to_numpy()
                                for f in json.loads(Path(url, "manifest.json").read_text())["splits"]["test"]["files"]])
    assert table["id"].to_pylist() == shard_ids.tolist() and sorted(shard_ids) != shard_ids.tolist()
    assert table.column_names == ["id", "label", "emb_seq", "emb_vec", "emb_fused"]
    from s3dist.data.stream import ShardStream

    for batch in ShardStream(url, "test", batch_size=23, shuffle_buffer=0, drop_last=False):
        want = back.embed(batch.features, batch.masks, keep_fraction=0.4)["fused"].numpy()
        row = {int(i): r for r, i in enumerate(table["id"].to_numpy())}
        got = np.stack([table["emb_fused"][row[int(i)]].as_py() for i in batch.ids])
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".emb.parquet*"))  # part files are removed


# ---------------------------------------------------------------------------------------------
# Slow: a real 2-rank ep=2 run, exported
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(reference_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "exported"
    p = _cli("export", "--run", reference_run, "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.slow
def test_export_folder_holds_config_weights_and_model_card(reference_run, exported, tmp_path):
    """config.json rebuilds the encoder (modalities, widths, run config, Stage-3 thresholds of eval.json,
    where the data is, version); model.safetensors holds every expert of both ranks under its global index,
    bit-equal to the checkpoint; the model card shows the run's figures. A .safetensors --out still writes
    the single-file export."""
    from safetensors.torch import load_file

    import s3dist
    from s3dist.checkpoint import consolidated_state_dict, find_latest
    from s3dist.config import ConfigError
    from s3dist.export import export, load_export

    conf = json.loads((exported / "config.json").read_text())
    ev = json.loads((reference_run / "eval.json").read_text())
    assert conf["modalities"] == ["text", "audio"] and conf["input_dims"] == {"text": 12, "audio": 8}
    assert conf["run_config"]["moe"]["kind"] == "s3" and conf["run_config"]["model"]["d_model"] == 32
    assert conf["stage3"] == ev["stage3"] and list(conf["stage3"]["thresholds"]) == [str(P)]
    assert conf["data"]["embedded_synthetic"] and conf["data"]["run_dir"] == str(reference_run.resolve())
    assert conf["s3dist_version"] == s3dist.__version__ and conf["checkpoint"]["world_size"] == 2
    assert conf["evaluation"]["probe_accuracy"] == ev["probe_accuracy"]

    weights = load_file(str(exported / "model.safetensors"))
    ckpt = consolidated_state_dict(find_latest(reference_run))
    assert weights.keys() == ckpt.keys()
    for k in weights:
        assert torch.equal(weights[k], ckpt[k]), k
    experts = {k.split("deepspeed_experts.")[1].split(".")[0] for k in weights if "deepspeed_experts" in k}
    assert experts == {str(i) for i in range(8)}  # 2 modalities x 4 experts, from both ranks

    card = (exported / "README.md").read_text()
    assert "library_name: s3dist" in card and f"Probe accuracy at p = 1: {ev['probe_accuracy']:.4f}" in card
    assert f"| {P:g} | {ev['sweep'][0]['accuracy']:.4f} |" in card

    single = export(reference_run, tmp_path / "new" / "model.safetensors")  # its folder is created
    assert single.is_file() and load_export(single)[0]["moe"]["kind"] == "s3"
    single.write_bytes(b"notes")  # now a file export did not write: left alone
    with pytest.raises(ConfigError, match=r"model\.safetensors exists and is not an s3dist export"):
        export(reference_run, single)
    export(reference_run, tmp_path / "again.safetensors")
    assert export(reference_run, tmp_path / "again.safetensors").is_file()  # an export is replaced


def _distributed_embeddings(rank, world, out_dir, run_dir):
    """The ep=2 encoder as training holds it (DeepSpeed engine, experts split over 2 ranks, all-to-all),
    evaluated the way training's evaluation does: Stage 3 calibrated here, test split extracted, gathered."""
    from s3dist import evaluate
    from s3dist.checkpoint import find_latest, read_meta
    from s3dist.config import from_dict
    from s3dist.data.manifest import read_manifest
    from s3dist.dist import build_engine, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder

    ckpt = find_latest(Path(run_dir))
    cfg = from_dict(read_meta(ckpt)["config"])
    dims = make_dims(*init_distributed(cfg.dist), 2)
    url = str(Path(run_dir) / "data")
    man = read_manifest(url)
    model = S3Encoder({m: man.modalities[m].width for m in cfg.data.modalities}, cfg.model, cfg.moe, ep_size=2,
                      ep_rank=dims.ep_rank)
    engine = build_engine(model, list(model.parameters()), lr=1e-3, total_steps=1, optim=cfg.optim,
                          dist_cfg=cfg.dist, micro_batch=4)
    engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    streams = evaluate._streams(cfg, url, dims.rank, dims.world_size)
    by_p = evaluate.sparsifiers(cfg, model, streams["train"], [P, 1.0], dims.device)
    got = evaluate._gather_to_main(evaluate.extract(model, streams["test"], by_p, dims.device))
    return None if got is None else {"ids": got["ids"], "emb": got["emb"]}


FRESH = """
import sys
import numpy as np
import torch
from s3dist import S3Encoder
from s3dist.data.stream import ShardStream

export, run_dir, out = sys.argv[1:]
enc = S3Encoder.from_pretrained(export)
same = S3Encoder.from_pretrained(run_dir).state_dict()
assert all(torch.equal(v, same[k]) for k, v in enc.state_dict().items())
res = {}
for split in ("train", "val", "test"):
    ids, labels, emb = [], [], {1.0: [], 0.3: []}
    for batch in ShardStream(enc.data_url(), split, batch_size=48, shuffle_buffer=0, drop_last=False):
        ids.append(batch.ids.numpy())
        labels.append(batch.labels.numpy())
        for p in emb:
            emb[p].append(enc.embed(batch.features, batch.masks, keep_fraction=p)["fused"].numpy())
    res[split + "_ids"], res[split + "_labels"] = np.concatenate(ids), np.concatenate(labels)
    for p, parts in emb.items():
        res[f"{split}_{p}"] = np.concatenate(parts)
assert not torch.distributed.is_initialized()
np.savez(out, **res)
print("process group initialised:", torch.distributed.is_initialized())
"""


@pytest.mark.slow
def test_from_pretrained_in_fresh_process_matches_distributed_encoder(reference_run, exported, tmp_path):
    """A fresh `python` that never initialises torch.distributed loads the export (and the run directory:
    same weights) and reproduces the 2-rank ep=2 encoder's test-split embeddings to 1e-5, at p = 1 and with
    Stage 3 at p = 0.3, and the probe accuracies of the run's own evaluation."""
    from s3dist.config import from_dict
    from s3dist.evaluate import fit_probe

    dist = run_ranks(_distributed_embeddings, 2, tmp_path / "dist", str(reference_run))[0]
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    p = subprocess.run([sys.executable, str(script), str(exported), str(reference_run), str(tmp_path / "fresh.npz")],
                       cwd=tmp_path, env=_plain_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "process group initialised: False" in p.stdout
    fresh = np.load(tmp_path / "fresh.npz")

    order_d, order_f = np.argsort(dist["ids"]), np.argsort(fresh["test_ids"])
    assert np.array_equal(dist["ids"][order_d], fresh["test_ids"][order_f])
    for p_ in (1.0, P):
        np.testing.assert_allclose(fresh[f"test_{p_}"][order_f], dist["emb"][p_][order_d], atol=1e-5, rtol=0)
    assert np.abs(fresh[f"test_{P}"] - fresh["test_1.0"]).max() > 1e-3  # Stage 3 did prune

    ev = json.loads((reference_run / "eval.json").read_text())
    cfg = from_dict(json.loads((exported / "config.json").read_text())["run_config"])
    by_id = {s: np.argsort(fresh[f"{s}_ids"], kind="stable") for s in ("train", "val", "test")}  # as evaluation
    for row in ev["sweep"]:
        k = row["keep_fraction"]
        x = {s: (fresh[f"{s}_{k}"][o], fresh[f"{s}_labels"][o]) for s, o in by_id.items()}
        got = fit_probe(*x["train"], *x["val"], *x["test"], cfg.eval.probe_Cs, cfg.eval.probe_max_iter)
        assert got["accuracy"] == row["accuracy"] and got["val_accuracy"] == row["val_accuracy"], (k, got, row)


def _embed(world: int, *args) -> subprocess.CompletedProcess:
    """`s3dist embed ARGS` as one process, or `-m s3dist.embed ARGS` as a 2-rank job (tests/multirank.py)."""
    if world == 1:
        return run_main("s3dist.cli", ["embed", *args], world=1)
    return run_main("s3dist.embed", list(args), world=world)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["test", "train"])
def test_embed_one_and_two_ranks_write_the_same_parquet(reference_run, exported, tmp_path, split):
    """`s3dist embed` on 1 process and on 2 ranks (as under `accelerate launch`) writes byte-identical Parquet
    files: one row per sample of the split, in shard order, each with its own label and embeddings (checked
    against `embed` in this process). test: whole, uneven shards per rank (one rank runs out of rows
    first); train: every other row per rank."""
    import pyarrow.parquet as pq

    from s3dist.data.stream import ShardStream
    from s3dist.embed import _is_embedding_file
    from s3dist.pretrained import S3Encoder

    files = {}
    for world in (1, 2):
        files[world] = tmp_path / f"{split}-{world}.parquet"
        p = _embed(world, "--model", exported, "--split", split, "--out", files[world], "--keep-fraction", P,
                   "--batch-size", 16)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert hashlib.sha256(files[1].read_bytes()).digest() == hashlib.sha256(files[2].read_bytes()).digest()
    assert _is_embedding_file(files[1])  # so the same command may replace it

    table = pq.read_table(files[2])
    man = json.loads((reference_run / "data" / "manifest.json").read_text())["splits"][split]
    shard_ids = np.concatenate([pq.read_table(reference_run / "data" / f, columns=["id"])["id"].to_numpy()
                                for f in man["files"]])
    assert table.num_rows == man["rows"] and table["id"].to_pylist() == shard_ids.tolist()
    enc = S3Encoder.from_pretrained(exported)
    row = {int(i): r for r, i in enumerate(table["id"].to_numpy())}
    for batch in ShardStream(str(reference_run / "data"), split, batch_size=64, shuffle_buffer=0, drop_last=False):
        out = enc.embed(batch.features, batch.masks, keep_fraction=P)
        rows = [row[int(i)] for i in batch.ids]
        assert table["label"].take(rows).to_pylist() == batch.labels.tolist()
        for m in ("text", "audio", "fused"):
            got = np.stack(table[f"emb_{m}"].take(rows).to_numpy(zero_copy_only=False))
            np.testing.assert_allclose(got, out[m].numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_eval_model_folder_finds_or_names_its_data(reference_run, exported, tmp_path):
    """`s3dist eval --model FOLDER` without --data evaluates on the run's embedded data set and gets the run's
    figures; when the run directory is gone it exits 2 naming the --data to pass and the command that
    regenerates that data set, which does regenerate it (same shard checksums)."""
    ev = _cli("eval", "--model", exported, "--out", tmp_path / "ev", "--keep-fraction", P)
    assert ev.returncode == 0, ev.stderr[-3000:]
    got, want = (json.loads(f.read_text()) for f in (tmp_path / "ev" / "eval.json", reference_run / "eval.json"))
    assert got["sweep"] == want["sweep"] and got["probe_accuracy"] == want["probe_accuracy"]

    moved = tmp_path / "moved"
    moved.mkdir()
    for f in exported.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    conf = json.loads((moved / "config.json").read_text())
    conf["data"]["run_dir"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(conf))
    bad = _cli("eval", "--model", moved, "--out", tmp_path / "bad")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert f"pass --data {tmp_path / 'gone'}/data" in bad.stderr
    command = re.search(r"`(s3dist data synth --out DIR[^`]*)`", bad.stderr).group(1)
    regen = _cli(*command.replace("DIR", str(tmp_path / "regen")).split()[1:])
    assert regen.returncode == 0, regen.stderr[-2000:]
    sums = lambda url: {s: v["checksums"] for s, v in json.loads((url / "manifest.json").read_text())["splits"].items()}  # noqa: E731
    assert sums(tmp_path / "regen") == sums(reference_run / "data")


@pytest.mark.slow
def test_readme_example_runs_as_written(exported, tmp_path):
    """The Python block of README.md's "Use a trained encoder", run as written in a fresh process next to an
    export named as in the example."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use a trained encoder\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'from_pretrained("exported")' in code
    (tmp_path / "exported").symlink_to(exported)
    (tmp_path / "example.py").write_text(code)
    p = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=_plain_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "torch.Size([4, 64])" in p.stdout
    assert {f.name for f in (tmp_path / "exported-copy").iterdir()} == {"config.json", "model.safetensors", "README.md"}


def test_from_pretrained_names_a_local_path_that_does_not_exist(tmp_path):
    """A path that cannot be a Hub id ('a/b/c', '/abs', './rel', 'x.safetensors') is a local path: a typo is
    a FileNotFoundError naming it, not a Hub lookup failing on the id's form."""
    from s3dist.pretrained import S3Encoder

    for name in (str(tmp_path / "nothing"), "./nothing", "runs/a/b", "model.safetensors"):
        with pytest.raises(FileNotFoundError, match="does not exist: give an s3dist export"):
            S3Encoder.from_pretrained(name)
