"""Every `s3dist` command ends on bad input the same way (`s3dist.exits`): one line `s3dist COMMAND: KIND: ...`
on stderr, exit code 2, no traceback; a lost peer is one line and exit 1; a bug keeps its traceback."""

from __future__ import annotations

import pytest

from s3dist.cli import main


@pytest.mark.parametrize("argv, line", [
    (["config", "show", "optim.lr=-1"], "s3dist config: config error: config key 'optim.lr' = -1.0 is out of range"),
    (["export", "--run", "{tmp}/nothing", "--out", "{tmp}/x"], "s3dist export: checkpoint error: "),
    (["eval", "--run", "{tmp}/nothing"], "s3dist eval: checkpoint error: no complete checkpoint in"),
    (["sweep", "--run", "{tmp}/a", "{tmp}/b"], "s3dist sweep: data error: '{tmp}/a/eval.json' is missing"),
    (["embed", "--model", "{tmp}/nothing", "--out", "{tmp}/e.parquet"], "s3dist embed: "),
    (["data", "inspect", "{tmp}/nothing"], "s3dist data: "),
])
def test_bad_input_is_one_line_and_exit_2_for_every_command(tmp_path, capsys, argv, line):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith(line.replace("{tmp}", str(tmp_path))), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_a_lost_peer_is_one_line_and_exit_1_and_a_bug_keeps_its_traceback(capsys, monkeypatch):
    import s3dist.config_cli as config_cli

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:17837."

    def lost(args):
        raise RuntimeError(gloo)

    monkeypatch.setattr(config_cli, "_reference", lost)
    assert main(["config", "reference"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("s3dist config: rank 0 stops: a collective failed because another rank is gone") and \
        "run the command again" in err and err.count("\n") == 1, err

    monkeypatch.setattr(config_cli, "_reference", lambda args: [][0])
    with pytest.raises(IndexError):
        main(["config", "reference"])
