"""Nothing s3dist reads from a run or a recipe can steer a write or a read outside the run directory."""

from __future__ import annotations

import pytest

from s3dist.config import ConfigError, check_safe_name, load_config


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "a\\b", "tab\there", "nul\x00", "x/../../etc"])
def test_unsafe_names_are_refused(bad):
    """Path separators, '..', empty names and control characters are refused with the key named."""
    with pytest.raises(ConfigError, match="run name"):
        check_safe_name("run name", bad)


def test_odd_but_safe_names_pass():
    """Spaces, quotes and $(...) are legal characters in a name (they are never given to a shell)."""
    for ok in ["my run", "exp-1.2_final", "$(touch pwned)", "it's"]:
        check_safe_name("name", ok)
    assert load_config(None, ["name=my run $(x)"]).name == "my run $(x)"


def test_tampered_latest_pointer_cannot_escape(tmp_path):
    """A `latest` file naming '../../elsewhere' is refused instead of being followed."""
    from s3dist.checkpoint import find_latest

    root = tmp_path / "run" / "checkpoints"
    (root / "step-00000010-specialize").mkdir(parents=True)
    (root / "latest").write_text("../../elsewhere")
    with pytest.raises(ConfigError, match="checkpoint tag in 'latest'"):
        find_latest(tmp_path / "run")


def test_rank_state_is_loaded_weights_only(tmp_path):
    """Per-rank s3dist state is read with weights_only=True: a pickle carrying code is refused."""
    import pickle

    from s3dist.checkpoint import load_rank_state

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "s3dist_rank0.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(Exception):
        load_rank_state(tmp_path, 0)
    assert not (tmp_path / "pwned").exists()
