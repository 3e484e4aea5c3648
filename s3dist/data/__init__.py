"""The data plane: data-set format (manifest + Parquet shards), importers, the synthetic generator and
the resumable per-rank training stream.

Submodules are imported where used (`from s3dist.data.stream import ShardStream`) so that importing
`s3dist.data` stays cheap; only the shared error type lives here.
"""


class DataError(ValueError):
    """Bad input data: the message names the file, row or key and says what to do."""
