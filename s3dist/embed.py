"""`s3dist embed`: a trained encoder's embeddings of one data split, as one Parquet file in data order.

    s3dist embed --model EXPORT_DIR | --run RUN_DIR [--data URL] --split test --out emb.parquet [--keep-fraction P]
    accelerate launch --config_file launch_configs/cpu_2proc.yaml -m s3dist.embed --model EXPORT_DIR ... (N ranks)

One row per sample of the split, in the order of its shards: `id`, `label`, `emb_<modality>` per
modality and `emb_fused` (the modalities concatenated in the encoder's order, as evaluation does), each
a fixed-size list of float32.

Every rank holds the whole encoder (`s3dist.pretrained`: ep_size=1, no collective in its forward) and
embeds its part of the split (`ShardStream`, no shuffling, no row dropped), streaming its rows into a
part file next to the output. Rank 0 then writes the one Parquet file, rows put back in data order by
their id and checked: every row of the split exactly once. The file does not depend on the number of
ranks. The output folder must be one every rank sees (as for checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from s3dist import exits

ROWS_PER_GROUP = 4096  # Parquet row-group size of the output (independent of the number of ranks)


def embed_split(encoder, data_url: str, split: str, out: Path, *, keep_fraction: float = 1.0,
                batch_size: int = 256, rank: int = 0, world: int = 1) -> Path:
    """Write `out` (collective when world > 1: every rank calls it). Returns `out`."""
    import torch.distributed as dist

    from s3dist.data.stream import evaluation_stream

    cfg = encoder.run_config
    stream = evaluation_stream(data_url, split, cfg.data, cfg.seed, rank, world, batch_size=batch_size,
                               modalities=list(encoder.modalities))
    encoder.check_manifest(stream.manifest, data_url)
    encoder.sparsifier(keep_fraction)  # fail before reading anything if p has no thresholds
    out.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(out, rank, world)
    _write_part(encoder, stream, part, keep_fraction, show_progress=rank == 0)
    if world > 1:
        dist.barrier()  # every part is on disk
    failure = None
    if rank == 0:
        try:
            _merge_in_data_order(encoder, stream, [_part_path(out, r, world) for r in range(world)], out,
                                 keep_fraction, split)
        except Exception as e:
            failure = e
        finally:
            for r in range(world):
                _part_path(out, r, world).unlink(missing_ok=True)
    if world > 1:  # the others end with rank 0, and fail with it
        box = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(box, src=0)
        if rank and box[0]:
            raise RuntimeError(f"rank 0 could not write '{out}': {box[0]}")
    if failure is not None:
        raise failure
    return out


def _part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f".{out.name}.part{rank}-of-{world}.arrow")


def _schema(encoder, keep_fraction: float, split: str):
    import pyarrow as pa

    import s3dist

    d = encoder.run_config.model.d_model
    fields = [pa.field("id", pa.int64()), pa.field("label", pa.int64())]
    fields += [pa.field(f"emb_{m}", pa.list_(pa.float32(), d)) for m in encoder.modalities]
    fields.append(pa.field("emb_fused", pa.list_(pa.float32(), d * len(encoder.modalities))))
    meta = {"modalities": list(encoder.modalities), "keep_fraction": float(keep_fraction), "split": split,
            "s3dist_version": s3dist.__version__}
    return pa.schema(fields, metadata={"s3dist": json.dumps(meta)})


def _is_embedding_file(path: Path) -> bool:
    """A Parquet file this command wrote (its schema carries the `s3dist` metadata `_schema` puts there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return b"s3dist" in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def _write_part(encoder, stream, part: Path, keep_fraction: float, show_progress: bool) -> None:
    """This rank's rows, batch by batch, into an Arrow IPC file (read back memory-mapped by rank 0)."""
    import numpy as np
    import pyarrow as pa
    from tqdm import tqdm

    schema = _schema(encoder, keep_fraction, stream.split)
    columns = [f"emb_{m}" for m in encoder.modalities] + ["emb_fused"]
    with pa.OSFile(str(part), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        # disable=None: a bar only on a terminal, and only on rank 0
        for batch in tqdm(stream, total=stream.batches_per_epoch, desc=f"embed {stream.split}", unit="batch",
                          disable=None if show_progress else True):
            if len(batch) == 0:  # ranks with fewer rows get empty batches at the end
                continue
            emb = encoder.embed(batch.features, batch.masks, keep_fraction=keep_fraction)
            arrays = [pa.array(batch.ids.numpy()), pa.array(batch.labels.numpy())]
            for col, key in zip(columns, [*encoder.modalities, "fused"]):
                x = np.ascontiguousarray(emb[key].cpu().numpy(), dtype=np.float32)
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]))
            writer.write_batch(pa.record_batch(arrays, schema=schema))


def _split_ids_in_order(stream):
    """The split's ids in data order: its shards in manifest order, rows in file order."""
    import numpy as np
    import pyarrow.parquet as pq

    from s3dist.data.manifest import dataset_fs

    fs, root = dataset_fs(stream.url)
    parts = []
    for fname in stream.manifest.splits[stream.split].files:
        with fs.open(f"{root}/{fname}", "rb") as f:
            parts.append(pq.read_table(f, columns=["id"])["id"].to_numpy())
    return np.concatenate(parts)


def _merge_in_data_order(encoder, stream, parts: list[Path], out: Path, keep_fraction: float, split: str) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in parts])
    order_ids = _split_ids_in_order(stream)
    ids = table["id"].to_numpy()
    sorter = np.argsort(order_ids, kind="stable")
    at = np.searchsorted(order_ids, ids, sorter=sorter).clip(max=len(order_ids) - 1)
    pos = sorter[at]
    unknown = ids[order_ids[pos] != ids]
    counts = np.bincount(pos, minlength=len(order_ids))
    if len(unknown) or (counts != 1).any():
        raise RuntimeError(f"embed {split}: rows do not cover the split exactly once (unknown ids "
                           f"{unknown[:5].tolist()}, duplicated ids {order_ids[counts > 1][:5].tolist()}, missing ids "
                           f"{order_ids[counts == 0][:5].tolist()}); this is a bug in s3dist embed or ShardStream")
    rows = np.argsort(pos, kind="stable")
    tmp = out.with_name(f".{out.name}.tmp")
    with pq.ParquetWriter(str(tmp), _schema(encoder, keep_fraction, split)) as writer:
        for i in range(0, len(rows), ROWS_PER_GROUP):
            writer.write_table(table.take(rows[i:i + ROWS_PER_GROUP]), row_group_size=ROWS_PER_GROUP)
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------
# CLI: `s3dist embed ...` (one process) and `python -m s3dist.embed ...` (under accelerate launch)
# ---------------------------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="exported encoder folder (s3dist export), or a .safetensors export")
    src.add_argument("--run", type=Path, help="run directory (its newest checkpoint)")
    p.add_argument("--data", help="data set URL (default: the one the run trained on, when it can be found)")
    p.add_argument("--split", default="test", help="split to embed (default: test)")
    p.add_argument("--out", required=True, type=Path, help="output Parquet file")
    p.add_argument("--keep-fraction", type=float, default=1.0,
                   help="Stage 3: keep fraction p (default 1: no pruning); needs thresholds calibrated for p")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch and rank (default: the run's "
                                                                 "data.eval_batch_size)")


def _cli_embed(args) -> int:
    import dataclasses

    import torch
    import torch.distributed as dist

    from s3dist.config import ConfigError
    from s3dist.outputs import check_output_file
    from s3dist.pretrained import S3Encoder

    check_output_file(args.out, "--out", ours=_is_embedding_file, kind="an s3dist embedding file",
                      example="emb.parquet")
    if not 0.0 <= args.keep_fraction <= 1.0:
        raise ConfigError(f"--keep-fraction {args.keep_fraction} is outside [0, 1]: it is the fraction of routing "
                          f"paths Stage 3 keeps (1: no pruning)")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1 (leave it out for the run's "
                          f"data.eval_batch_size)")
    source = args.model or args.run
    if not source.exists():  # a local path, never a Hub id: a typo is named, not looked up on the Hub
        raise FileNotFoundError(f"{'--model' if args.model else '--run'} {source} does not exist")
    encoder = S3Encoder.from_pretrained(source)
    data_url = encoder.data_url(args.data, what=f"'{source}'")
    if not args.data:
        from s3dist.data.manifest import read_manifest

        read_manifest(data_url, recorded_by=f"'{source}'")  # a data set moved since is named as such
    try:
        encoder.sparsifier(args.keep_fraction)
    except ValueError as e:  # no thresholds for this p: exit 2 with the message, before anything is read
        raise ConfigError(f"--keep-fraction {args.keep_fraction}: {e}") from e
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, device = 0, torch.device("cpu")
    if world > 1:  # launched with N ranks: a process group only to split the data and meet at the end
        from s3dist.dist import init_distributed

        # the encoder runs in float32 whatever the training precision
        rank, _, world, device, _ = init_distributed(dataclasses.replace(encoder.run_config.dist, dtype="fp32"))
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    encoder.to(device)
    try:
        embed_split(encoder, data_url, args.split, args.out, keep_fraction=args.keep_fraction,
                    batch_size=args.batch_size or encoder.run_config.data.eval_batch_size, rank=rank, world=world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(args.out)
    return 0


def add_subcommands(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    _add_arguments(p)
    p.set_defaults(func=_cli_embed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="s3dist embed", description=__doc__.splitlines()[0])
    _add_arguments(p)
    args = p.parse_args(argv)
    return exits.run(_cli_embed, args, prog="s3dist embed")


if __name__ == "__main__":
    sys.exit(main())
