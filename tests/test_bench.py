"""`s3dist bench moe | train | plan` at tiny sizes: they run, write well-formed JSON records, and the
scaling model's all-to-all bytes equal the bytes counted in a real 2-rank run. No timing is asserted."""

from __future__ import annotations

import json
import sys

import pytest

from s3dist.bench.plan import PlanSpec, alltoall_bytes, capacity, memory, predict
from s3dist.cli import main

RECORD_KEYS = {"benchmark", "command", "date", "machine", "versions", "figures"}


def _bench(monkeypatch, argv: list[str]) -> None:
    """Run `s3dist <argv>` in this process, with sys.argv as the console script would see it (the
    record stores the command from it)."""
    monkeypatch.setattr(sys, "argv", ["s3dist", *argv])
    assert main(argv) == 0


def _record(path, name):
    doc = json.loads(path.read_text())
    assert RECORD_KEYS <= set(doc), doc.keys()
    assert doc["benchmark"] == name and doc["command"].startswith(f"s3dist bench {name}")
    assert "torch" in doc["versions"] and "deepspeed" in doc["versions"] and doc["machine"]["cpus"]
    return doc["figures"]


# ---------------------------------------------------------------------------------------------
# plan (single process)
# ---------------------------------------------------------------------------------------------


def test_plan_model_arithmetic():
    """Capacity and buffer sizes follow the dispatch rule: [E, C, d] per all-to-all, 4 per layer."""
    spec = PlanSpec(ep=2, modalities=3, batch_per_gpu=128, views=1, seq_len=16, d_model=64, experts=4, topk=2,
                    capacity_factor=1.25, layers=1)
    assert capacity(spec) == 1280  # ceil(1.25 * 2 * 2048 / 4)
    a2a = alltoall_bytes(spec)
    assert a2a == {"calls": 4, "buffer_bytes": 4 * 12 * 1280 * 64 * 4, "offrank_bytes": 2 * 12 * 1280 * 64 * 4,
                   "bytes_per_call": 12 * 1280 * 64 * 4}
    per_modality = alltoall_bytes(PlanSpec(**{**spec.__dict__, "kind": "topk"}))
    assert per_modality["calls"] == 12 and per_modality["buffer_bytes"] == a2a["buffer_bytes"]
    assert alltoall_bytes(PlanSpec(**{**spec.__dict__, "ep": 1, "gpus_per_node": 1}))["calls"] == 0
    # min_capacity wins for tiny batches
    assert capacity(PlanSpec(batch_per_gpu=1, seq_len=1, views=1, min_capacity=4)) == 4
    # expert memory: 12 experts over ep=2 -> 6 local, each 2*d*h + h + d parameters
    assert memory(spec)["expert_params_per_gpu"] == 6 * (2 * 64 * 128 + 128 + 64)


def test_plan_network_split():
    """ep inside a node sends nothing over the network; ep over two nodes sends (ep-G)/(ep-1) of it."""
    inside = predict(PlanSpec(nodes=8, gpus_per_node=8, ep=8, experts=8))
    assert inside["network_bytes_per_gpu"] == 0 and inside["nvlink_bytes_per_gpu"] > 0
    across = predict(PlanSpec(nodes=8, gpus_per_node=8, ep=16, experts=16, modalities=1))
    leaving = across["all_to_all"]["offrank_bytes"]
    assert across["network_bytes_per_gpu"] == pytest.approx(leaving * 8 / 15)
    assert 0 < across["comm_share"] < 1


def test_plan_command_writes_record(tmp_path, capsys, monkeypatch):
    out = tmp_path / "plan.json"
    _bench(monkeypatch, ["bench", "plan", "--nodes", "8", "--gpus-per-node", "8", "--ep", "8", "--experts", "8",
                         "--seq-len", "50", "--dataset-samples", "16000", "--json", str(out)])
    fig = _record(out, "plan")
    assert fig["spec"]["nodes"] == 8 and fig["prediction"]["steps_per_epoch"] > 0
    assert {"all_to_all", "comm_ms", "compute_ms", "comm_share", "expert_weight_bytes"} <= set(fig["prediction"])
    assert "predicted all-to-all share" in capsys.readouterr().out


def test_json_replaces_a_record_refuses_other_files_and_makes_its_folder(tmp_path, capsys, monkeypatch):
    """`--json FILE` is checked before the benchmark runs: an earlier record is replaced, any other file left
    alone with a one-line error; a new folder for it is made."""
    notes = tmp_path / "BENCHMARKS.md"
    notes.write_text("# figures\n")
    monkeypatch.setattr(sys, "argv", ["s3dist", "bench", "plan", "--json", str(notes)])
    assert main(["bench", "plan", "--json", str(notes)]) == 2
    assert "--json " + str(notes) + " exists and is not an s3dist benchmark record" in capsys.readouterr().err
    assert notes.read_text() == "# figures\n"
    out = tmp_path / "new" / "plan.json"
    for _ in range(2):  # written, then replaced
        _bench(monkeypatch, ["bench", "plan", "--json", str(out)])
        assert _record(out, "plan")["prediction"]["comm_ms"] > 0


# ---------------------------------------------------------------------------------------------
# moe and train (2 real gloo ranks)
# ---------------------------------------------------------------------------------------------


def test_bench_experts_record_and_auto_choice(tmp_path, monkeypatch):
    """`bench experts`: one row per shape with both paths timed, and the CPU choice `auto` makes there
    (grouped for a tiny per-expert GEMM, the loop above the threshold)."""
    out = tmp_path / "experts.json"
    _bench(monkeypatch, ["bench", "experts", "--shape", "4,8,4,2,2", "--shape", "2,40000,4,1,1", "--repeats", "1",
                         "--warmup", "0", "--json", str(out)])
    rows = _record(out, "experts")["shapes"]
    assert [(r["experts"], r["rows"], r["auto_cpu"]) for r in rows] == [(4, 8, "grouped"), (2, 40000, "loop")]
    assert all(r["loop_ms"] > 0 and r["grouped_ms"] > 0 for r in rows)


def test_bench_moe_granularity_sets_experts_k_and_fine_grained_width():
    """`--granularity G`: N = G x rho, k = G, and unless --hidden is given k x hidden stays the default's
    2 x 128; without it the flags are used as given."""
    import argparse

    from s3dist.bench.moe import add_arguments, resolve_granularity

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--granularity", "8"])
    resolve_granularity(args)
    assert (args.experts, args.topk, args.hidden) == (16, 8, 32)
    args = p.parse_args(["--granularity", "4", "--expansion", "3", "--hidden", "50"])
    resolve_granularity(args)
    assert (args.experts, args.topk, args.hidden) == (12, 4, 50)
    args = p.parse_args(["--experts", "5", "--topk", "3"])
    resolve_granularity(args)
    assert (args.experts, args.topk, args.hidden) == (5, 3, 128)


@pytest.mark.slow
def test_bench_moe_record_and_counted_bytes_match_plan(tmp_path, monkeypatch):
    """`bench moe` on 2 ranks: every variant reports throughput, ratios and shares, and the bytes it
    handed to all_to_all equal the plan model's for the same layer (fwd + bwd, ep=2)."""
    out = tmp_path / "moe.json"
    _bench(monkeypatch, ["bench", "moe", "--ranks", "2", "--case", "both", "--batch", "4", "--steps", "3",
                          "--d-model", "8", "--hidden", "8", "--experts", "2", "--repeats", "2", "--warmup", "1",
                          "--profile-steps", "1", "--json", str(out)])
    fig = _record(out, "moe")
    assert set(fig["ratio_s3dist_vs_bare"]) == {"fused", "single"}
    for case, modalities in (("fused", 3), ("single", 1)):
        variants = fig[case]["variants"]
        assert set(variants) == {"s3dist", "bare", "topk-per-modality", "bare-free-gate"}
        # the free-gate floor replays the routes the gate computes: same output as bare, and its ceiling is recorded
        assert variants["bare-free-gate"]["replay_matches_bare"] is True
        assert fig[case]["cpu_ceiling_vs_bare"] == variants["bare-free-gate"]["cpu_vs_bare"] > 0
        for name, v in variants.items():
            assert v["tokens_per_s"] > 0 and 0 <= v["all_to_all_share"] <= 1 and v["vs_bare"] > 0
            spec = PlanSpec(ep=2, modalities=modalities, batch_per_gpu=4, views=1, seq_len=3, d_model=8,
                            experts=2, topk=2, capacity_factor=1.25, layers=1,
                            kind="topk" if name == "topk-per-modality" else "s3")
            predicted = alltoall_bytes(spec)
            predicted.pop("bytes_per_call")
            assert v["all_to_all_bytes_per_step"] == predicted, (case, name)


@pytest.mark.slow
def test_bench_train_record_memory_split_and_counted_bytes_match_plan(tmp_path, monkeypatch):
    """`bench train` on 2 ranks: all three layouts, the step split into phases, expert bytes per rank =
    1/ep of all expert bytes, the two ratios, and the Stage-1 step's counted all-to-all bytes equal
    the plan model's (two views per encoder call, every MoE layer)."""
    out = tmp_path / "train.json"
    over = ["data.synth.num_train=128", "data.synth.num_val=16", "data.synth.num_test=16",
            "data.synth.modality_dims=12,8", "data.synth.seq_len=6", "data.batch_size=8", "model.d_model=16",
            "moe.expert_hidden=16", "model.num_layers=2"]
    _bench(monkeypatch, ["bench", "train", "--ranks", "2", "--ep", "2", "--repeats", "1", "--warmup", "1",
                         "--profile-steps", "1", "--peak-tflops", "2", "--json", str(out), *over])
    fig = _record(out, "train")
    assert set(fig["layouts"]) == {"s3 ep=2", "s3 ep=1", "dense"}
    assert fig["ratio_ep2_vs_ep1"] > 0 and fig["ratio_dense_vs_s3"] > 0
    for v in fig["layouts"].values():
        assert set(v["phase_ms"]) == {"data", "forward", "all_to_all", "backward", "optimizer"}
        assert v["samples_per_s"] > 0 and v["tokens_per_s"] > 0
        assert len(v["parameter_bytes_per_rank"]) == 2 and len(v["step_peak_tensor_mb_per_rank"]) == 2
        assert v["aten_ops_per_step"] > 100  # a Stage-1 step dispatches hundreds of ops at least
    assert fig["layouts"]["s3 ep=2"]["host_ms_per_step"] > 0  # the first layout at tiny width
    ep2, ep1 = fig["layouts"]["s3 ep=2"], fig["layouts"]["s3 ep=1"]
    assert ep2["expert_fraction_per_rank"] == 0.5 and ep1["expert_fraction_per_rank"] == 1.0
    assert all(b["expert"] * 2 == ep2["expert_bytes_all_ranks"] for b in ep2["parameter_bytes_per_rank"])
    assert fig["layouts"]["dense"]["expert_bytes_all_ranks"] == 0
    spec = PlanSpec(ep=2, modalities=2, batch_per_gpu=8, views=2, seq_len=6, d_model=16, experts=4, topk=2,
                    capacity_factor=1.25, layers=2)
    predicted = alltoall_bytes(spec)
    predicted.pop("bytes_per_call")
    assert ep2["all_to_all_bytes_per_step"] == predicted
    assert ep1["all_to_all_bytes_per_step"]["calls"] == 0
    # Counted model FLOPs: sharding experts moves work between ranks but conserves it (E/ep experts x
    # ep*capacity slots per rank), and each layout's MFU is its TFLOP/s over the given peak.
    assert sum(ep2["flops_per_step_per_rank"]) == sum(ep1["flops_per_step_per_rank"]) > 0
    assert fig["peak_tflops_per_device"] == 2.0
    for v in fig["layouts"].values():
        assert v["mfu"] == pytest.approx(sum(v["model_tflops_per_s_per_rank"]) / 2 / 2.0)


@pytest.mark.parametrize("flag", ["--nodes", "--gpus-per-node", "--ep"])
def test_plan_refuses_a_count_below_one(monkeypatch, flag):
    with pytest.raises(SystemExit, match=f"{flag} 0 must be >= 1"):
        _bench(monkeypatch, ["bench", "plan", flag, "0"])


@pytest.mark.parametrize("flag", ["--profile-steps", "--repeats"])
def test_bench_moe_refuses_no_profiled_or_timed_step(monkeypatch, flag):
    """The table's shares and the median need a step: 0 is refused by name before any rank starts (it was a
    ZeroDivisionError after the timing)."""
    with pytest.raises(SystemExit, match=f"bench moe: {flag} 0 must be >= 1"):
        _bench(monkeypatch, ["bench", "moe", "--ranks", "1", flag, "0"])


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--experts", "0"], "argument --experts: 0 must be >= 1"),
    (["plan", "--mfu", "0"], "argument --mfu: 0.0 must be a finite number > 0"),
    (["plan", "--bandwidth-gbps", "nan"], "argument --bandwidth-gbps: nan must be a finite number > 0"),
    (["moe", "--batch", "0"], "argument --batch: 0 must be >= 1"),
    (["moe", "--ranks", "x"], "argument --ranks: 'x' is not an integer"),
    (["experts", "--repeats", "0"], "argument --repeats: 0 must be >= 1"),
    (["data", "--repeats", "0"], "argument --repeats: 0 must be >= 1"),
    (["train", "--repeats", "0"], "argument --repeats: 0 must be >= 1"),
])
def test_bench_counts_and_rates_out_of_range_are_refused_by_name(capsys, argv, needle):
    """A count below its minimum or a rate that is not > 0 exits 2 naming the flag, before any rank starts
    (they were ZeroDivisionErrors and assertions inside the benchmark)."""
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2 and needle in capsys.readouterr().err
