"""Checkpoint rotation never leaves a published checkpoint with files missing (no training run needed)."""

from __future__ import annotations

import shutil

import pytest

from s3dist import checkpoint as ckpt_io


def _publish(root, step: int) -> None:
    d = root / ckpt_io.tag_for(step, "specialize")
    (d / "sub").mkdir(parents=True)
    for i in range(3):
        (d / "sub" / f"f{i}.pt").write_bytes(b"x" * 10)
    (d / ckpt_io.META).write_text("{}")


def test_a_deletion_cut_short_leaves_no_partial_published_checkpoint(tmp_path, monkeypatch):
    """Rotation renames a checkpoint aside before deleting it: if the deletion dies half-way (here: after
    one file), no published checkpoint has files missing, readers see only complete ones, and the next
    rotation removes the leftover."""
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _publish(root, step)
    real = shutil.rmtree

    def dies_half_way(path, ignore_errors=False):
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if files:
            files[0].unlink()
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(ckpt_io.shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io._prune(root, keep_last=2)
    monkeypatch.setattr(ckpt_io.shutil, "rmtree", real)
    published = ckpt_io._complete(root)
    assert [p.name for p in published] == [ckpt_io.tag_for(s, "specialize") for s in (20, 30)]
    for p in published:
        assert len([f for f in p.rglob("*") if f.is_file()]) == 4
    assert [p.name for p in root.glob(".deleting-*")] == [".deleting-" + ckpt_io.tag_for(10, "specialize")]
    _publish(root, 40)
    ckpt_io._prune(root, keep_last=2)
    assert [p.name for p in ckpt_io._complete(root)] == [ckpt_io.tag_for(s, "specialize") for s in (30, 40)]
    assert not list(root.glob(".deleting-*"))
