"""The benchmark's reference port computes JEM's objective as jemkit does, and ``bench_step.py`` runs end to end.

A speed comparison is only fair if both contenders do the same work: these tests pin the port's loss and SGLD chain
to jemkit's on the same inputs and seed. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import torch

from jemkit import JEM, SGLD, ReplayBuffer
from jemkit.energy import marginal_energy
from jemkit.models import SmallCNN
from jemkit.sampling import InitialDistribution
from tests.helpers import KeepStart

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ holds scripts
import bench_step
from reference_jem import ReferenceJEM


class FixedInit(InitialDistribution):
    """Always returns the same chains: fixes jemkit's samples (with ``reinit_prob=1`` and no SGLD steps)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x

    def sample(self, n, shape, device=None, dtype=torch.float32, y=None):
        return self.x[:n].to(device, dtype, copy=True)  # the buffer writes into what it is given


def digits_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 1, 8, 8) * 2 - 1, torch.arange(n) % 10


def test_reference_loss_equals_jemkit_objective_on_fixed_samples():
    model = SmallCNN(width=4)
    x, y = digits_batch()
    x_sample = torch.rand_like(x) * 2 - 1
    jem = JEM(
        model,
        sampler=KeepStart(),
        buffer=ReplayBuffer(capacity=x.shape[0], reinit_prob=1.0, init=FixedInit(x_sample)),
        data_noise=0.0,
        weights={"px": 1.0, "energy_l2": 0.0},  # the reference's objective
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer
        jem_loss = jem.training_step((x, y), 0)
    ref_loss = ReferenceJEM(model).loss(x, x_sample, x, y)
    torch.testing.assert_close(ref_loss, jem_loss, rtol=1e-5, atol=1e-5)


def test_reference_sgld_follows_the_same_chain_as_jemkit():
    model = SmallCNN(width=4)
    x0, _ = digits_batch()
    ref = ReferenceJEM(model, n_steps=5, step_size=0.5, noise=0.01)
    torch.manual_seed(1)
    x_ref = ref.sgld(x0)
    torch.manual_seed(1)
    x_jem = SGLD(n_steps=5, step_size=0.5, noise_std=0.01).sample(lambda x: marginal_energy(model(x)), x0)
    assert not torch.equal(x_ref, x0)
    torch.testing.assert_close(x_ref, x_jem, rtol=1e-5, atol=1e-5)


def test_reference_step_trains_and_keeps_the_buffer_on_the_host():
    model = SmallCNN(width=4)
    x, y = digits_batch()
    ref = ReferenceJEM(model, buffer_size=16, n_steps=2, input_shape=(1, 8, 8))
    weights = [p.detach().clone() for p in model.parameters()]
    buffer = ref.buffer.clone()
    loss = ref.step(x, y)
    assert isinstance(loss, float) and math.isfinite(loss)
    assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
    assert ref.buffer.device.type == "cpu" and ref.buffer.shape == (16, 1, 8, 8)
    assert not torch.equal(ref.buffer, buffer)  # the refined samples were written back
    assert model.training


def test_bench_step_runs_and_prints_one_json_line(capsys, tmp_path):
    # Small batch and chains, one thread: a few seconds on 2 shared CPU cores (two threads there can be 100x slower).
    argv = ["--model", "small_cnn", "--iters", "2", "--warmup", "1", "--device", "cpu", "--threads", "1"]
    result = bench_step.main(
        [*argv, "--batch", "8", "--steps", "2", "--buffer-size", "64", "--json", str(tmp_path / "r.json")]
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    parsed = json.loads(line)
    assert parsed == json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))
    assert {"model", "device", "precision", "batch", "sgld_steps", "compile", "memory", "contenders", "ratios"} <= set(
        parsed
    )
    assert set(parsed["contenders"]) == {"classifier", "reference", "jemkit"}  # no reference_amp in fp32
    for stats in parsed["contenders"].values():
        assert {
            "median_ms",
            "q1_ms",
            "q3_ms",
            "iqr_ms",
            "state_mb",
            "step_peak_mb",
            "peak_mb",
            "gflop",
            "tflops",
        } <= set(stats)
        assert stats["median_ms"] > 0 and stats["gflop"] > 0
    assert set(parsed["ratios"]) == {"jemkit/reference", "reference/classifier", "jemkit/classifier"}
    assert parsed["compile"] == "off"


def test_bench_step_compares_with_both_reference_precisions_and_counts_compiled_flops(capsys):
    argv = ["--model", "small_cnn", "--iters", "1", "--warmup", "1", "--device", "cpu", "--threads", "1"]
    eager = bench_step.main([*argv, "--batch", "8", "--steps", "2", "--buffer-size", "64", "--precision", "bf16-mixed"])
    compiled = bench_step.main(
        [*argv, "--batch", "8", "--steps", "2", "--buffer-size", "64", "--precision", "bf16-mixed", "--compile"]
    )
    out = capsys.readouterr().out
    assert "reference_amp" in out and "speed-up of jemkit: reference / jemkit" in out
    for result in (eager, compiled):
        assert set(result["contenders"]) == {"classifier", "reference", "reference_amp", "jemkit"}
        assert "jemkit/reference_amp" in result["ratios"]
        assert result["peak_tflops"] is None and result["contenders"]["jemkit"]["peak_fraction"] is None  # no GPU
    assert (eager["compile"], compiled["compile"]) == ("off", "step")
    # The compiled step's FLOPs are counted on the same step run eagerly: the work is the same.
    assert compiled["contenders"]["jemkit"]["gflop"] == eager["contenders"]["jemkit"]["gflop"] > 0


def test_bf16_peak_is_looked_up_by_gpu_name():
    assert bench_step.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench_step.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_step.bf16_peak_tflops("NVIDIA H200") == 989.4
    assert bench_step.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench_step.bf16_peak_tflops("NVIDIA L40") == 181.0 and bench_step.bf16_peak_tflops("NVIDIA L4") == 121.0
    for unknown in ("NVIDIA A10G", "NVIDIA RTX A1000", "Some Unknown GPU"):  # no substring matches
        assert bench_step.bf16_peak_tflops(unknown) is None


def test_bench_suite_runs_a_configuration_in_its_own_process_and_tabulates_goals(tmp_path, capsys):
    import bench_suite

    small = ["--batch", "8", "--steps", "2", "--iters", "1", "--warmup", "0", "--buffer-size", "64"]
    results = bench_suite.main(["--preset", "cpu", "--only", "bf16-eager", "--out", str(tmp_path), *small])
    out = capsys.readouterr().out
    assert set(results) == {"bf16-eager"} and results["bf16-eager"]["batch"] == 8  # pass-through args win
    assert (tmp_path / "cpu-bf16-eager.json").exists() and (tmp_path / "cpu-summary.md").read_text() in out + "\n"
    assert "| bf16-eager |" in out and "jemkit / reference at equal precision (bf16-mixed)" in out


def test_bench_suite_goal_lines_on_gpu_results():
    import bench_suite

    def result(jem_ms, ref_ms, fraction, jem_mb, ref_mb, mode=None):
        contender = {"median_ms": 20.0, "tflops": 1.0, "peak_fraction": None, "peak_mb": 1.0}
        return {
            "device": "cuda",
            "compile_mode": mode,
            "hardware": "NVIDIA H100 80GB HBM3",
            "precision": "bf16-mixed",
            "contenders": {
                "classifier": contender,
                "reference": contender | {"median_ms": ref_ms, "peak_mb": ref_mb},
                "reference_amp": contender | {"median_ms": 190.0},
                "jemkit": contender | {"median_ms": jem_ms, "peak_fraction": fraction, "peak_mb": jem_mb},
            },
        }

    met = bench_suite.goals(
        {"slow": result(100.0, 300.0, 0.3, 900.0, 1000.0), "fast": result(60.0, 300.0, 0.55, 1100.0, 1000.0)}
    )
    assert met[0].startswith("fastest jemkit configuration: fast (60.0 ms")
    assert "5.00x (goal >= 4x: met)" in met[1] and "55.0% (goal >= 50%: met)" in met[2]
    assert "peak memory (fast): jemkit 1100 MB vs reference 1000 MB (goal: no higher: NOT met)" in met[3]
    # a CUDA-graph configuration is fastest, but memory is judged on the fastest one without CUDA graphs
    met = bench_suite.goals(
        {
            "plain": result(100.0, 300.0, 0.3, 900.0, 1000.0),
            "graphs": result(50.0, 300.0, 0.6, 10.0, 1000.0, "reduce-overhead"),
        }
    )
    assert met[0].startswith("fastest jemkit configuration: graphs")
    assert "peak memory (plain): jemkit 900 MB vs reference 1000 MB (goal: no higher: met)" in met[3]
    rows = bench_suite.table({"fast": result(60.0, 300.0, 0.55, 1100.0, 1000.0)}).splitlines()
    assert rows[2] == "| fast | 20.0 | 300.0 | 190.0 | 60.0 | 5.00x | 3.17x | 1.00 | 55.0 | 1100 / 1000 |"


def test_bench_step_also_times_the_defaults_and_the_plain_lightning_step(capsys):
    argv = ["--model", "small_cnn", "--iters", "2", "--warmup", "1", "--threads", "1", "--batch", "8"]
    result = bench_step.main([*argv, "--steps", "2", "--buffer-size", "64", "--also", "defaults", "plain"])
    out = capsys.readouterr().out
    assert set(result["contenders"]) == {"classifier", "reference", "jemkit", "jemkit_defaults", "jemkit_plain"}
    for name in ("jemkit_defaults", "jemkit_plain"):
        assert result["contenders"][name]["median_ms"] > 0 and result["contenders"][name]["gflop"] > 0
    # a default step (5 PYLD steps, one shared forward) counts more FLOPs than the classifier alone in Lightning
    assert result["contenders"]["jemkit_defaults"]["gflop"] > 3 * result["contenders"]["jemkit_plain"]["gflop"]
    assert {"jemkit_defaults/reference", "jemkit_defaults/jemkit_plain", "jemkit_plain/classifier"} <= set(
        result["ratios"]
    )
    assert "jemkit_defaults/jemkit_plain = " in out
