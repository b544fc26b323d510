"""The speed and scale benchmarks' measuring parts: the profiler's breakdown adds up, FLOP and memory counts are right.

Behaviour only: no wall-clock asserts.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_step
import scale


def test_profile_breakdown_names_every_part_and_adds_up_to_the_step():
    torch.set_num_threads(1)
    result = profile_step.run("default", steps=2, warmup=1, profile=True)
    parts = result["parts_ms"]
    assert {"sampler: forward + input gradient", "backward", "objective: forwards", "divergence guard"} <= set(parts)
    assert {"logging: self.log", "buffer: restarts (fresh draws)", profile_step.LOOP} <= set(parts)
    assert all(ms >= 0 for ms in parts.values())
    # exclusive times: the parts never add up to more than the profiled window (the loop is what no range covers)
    assert sum(parts.values()) == pytest.approx(result["ms_per_step"], rel=1e-6)
    table = profile_step.markdown({"default": result | {"unprofiled_ms": 1.0}}, rounds=1)
    assert "| sampler: forward + input gradient |" in table and "backward (plain loop too)" in table


def test_part_names_map_lightning_actions_and_leave_operators_alone():
    assert profile_step.part_of("jemkit::buffer: write samples") == "buffer: write samples"
    assert profile_step.part_of("[Callback]DivergenceGuard{'action': 'raise'}.on_before_backward") == "divergence guard"
    assert profile_step.part_of("[Strategy]SingleDeviceStrategy.backward") == "backward"
    assert profile_step.part_of("[LightningModule]JEM.on_train_batch_end") == "Lightning hooks"
    assert profile_step.part_of("aten::convolution") is None


def test_step_flops_count_the_parts_of_a_step():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(10, 8), torch.randint(0, 4, (10,))
    counts = scale.step_flops(model, x, y, 5)
    forward = 2 * 10 * (8 * 16 + 16 * 4)  # two FLOPs a multiply-add
    assert counts["forward"] == forward
    assert counts["plain"] == 3 * forward - 2 * 10 * 8 * 16  # the first layer's input gradient is not needed
    assert counts["train"] == 2 * counts["plain"]  # data and samples: twice the batch
    assert counts["input_grad"] == 2 * forward  # forward and the input-only backward
    ratio = scale.step_flop_ratio(counts, 5)
    assert ratio == pytest.approx((5 * counts["input_grad"] + counts["train"]) / counts["plain"])
    assert scale.step_flop_ratio(counts, 1, 4, first_layer=10.0) < ratio


def test_activation_bytes_count_each_kept_storage_once_on_any_device():
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

    torch.manual_seed(0)
    cpu = scale.activation_bytes(build(), torch.randn(2, 3, 6, 6))
    with torch.device("meta"):
        meta = scale.activation_bytes(build(), torch.randn(2, 3, 6, 6))
    assert cpu == meta > 0
    with torch.device("meta"):
        twice = scale.activation_bytes(build(), torch.randn(4, 3, 6, 6))
    assert meta < twice < 2 * meta + 1  # parameters kept for the backward do not grow with the batch


def test_estimate_and_its_table_on_a_small_model(monkeypatch):
    small = {"tiny": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10)), (3, 8, 8), 4)}
    monkeypatch.setattr(scale, "_models", lambda: small)
    result = scale.estimate(capacity=100)
    row = result["rows"][0]
    assert row["buffer_gb"]["float32"] == pytest.approx(100 * 3 * 8 * 8 * 4 / 1e9)
    assert row["buffer_gb"]["float32"] == 2 * row["buffer_gb"]["bf16"] == 4 * row["buffer_gb"]["uint8"]
    assert row["ratio_jem_sgld20"] > row["ratio_default"] > row["ratio_yopo_2x3"] > row["ratio_yopo_1x5"] > 1
    assert "| tiny | 4 |" in scale.estimate_markdown(result)


def test_quality_table_reads_means_spreads_and_time_ratios():
    run = {"scenario": "digits", "acc": 0.98, "ece": 0.02, "auroc": {"noise": {"logpx": 1.0}}}
    result = {
        "runs": [run | {"config": "default"}, run | {"config": "default", "acc": 0.96}],
        "timing": {"digits": {"default": {"ms": 10.0, "vs_default": 1.0}}},
    }
    table = scale.quality_markdown(result)
    assert "| digits | default | 0.970 ± 0.014 | 0.020 ± 0.000 | 1.000 ± 0.000 |" in table and "| 1.00 |" in table
