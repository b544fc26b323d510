"""Two-rank DDP on CPU (gloo): buffer shards are gathered into checkpoints and re-sharded on resume."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")]


def run(mode, out, devices, max_steps):
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(WORKER), mode, str(out), str(devices), str(max_steps)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_ddp_training_checkpoint_and_resume_on_one_and_two_ranks(tmp_path):
    run("fit", tmp_path, 2, 6)
    ranks = [torch.load(tmp_path / f"fit2_end_rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["buffer"].shape == (20, 2) for r in ranks)
    assert not torch.equal(ranks[0]["buffer"], ranks[1]["buffer"])  # each rank keeps its own shard
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # DDP keeps the weights in sync
    # metrics reduced across ranks: every rank logged the same values
    for key in ("val/cal/ece", "val/ood/uniform/logpx/auroc"):
        assert ranks[0]["metrics"][key] == ranks[1]["metrics"][key]
    sample_files = list((tmp_path / "logs_fit_2").glob("version_*/samples/landscape_final.png"))
    assert len(sample_files) == 1  # written once, by rank zero

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    full = saved["state_dict"]["buffer.samples"]
    assert full.shape == (40, 2)  # both shards
    assert torch.equal(full, torch.cat([ranks[0]["buffer"], ranks[1]["buffer"]]))
    assert saved["global_step"] == 6

    backup = tmp_path / "fit.ckpt"
    shutil.copy(tmp_path / "ckpt" / "last.ckpt", backup)
    run("resume", tmp_path, 1, 8)  # two ranks' checkpoint onto one rank
    one = torch.load(tmp_path / "resume1_start_rank0.pt")
    assert one["step"] == 6 and torch.equal(one["buffer"], full)
    assert torch.equal(one["weight"], saved["state_dict"]["classifier.net.1.weight"])

    shutil.copy(backup, tmp_path / "ckpt" / "last.ckpt")
    run("resume", tmp_path, 2, 8)  # and back onto two ranks
    for r in (0, 1):
        start = torch.load(tmp_path / f"resume2_start_rank{r}.pt")
        assert start["step"] == 6 and torch.equal(start["buffer"], full[20 * r : 20 * (r + 1)])


def test_ddp_ranks_agree_to_roll_back_when_one_rank_diverges(tmp_path):
    run("diverge", tmp_path, 2, 6)
    ranks = [torch.load(tmp_path / f"diverge2_end_rank{r}.pt") for r in (0, 1)]
    assert [r["rollbacks"] for r in ranks] == [1, 1]
    assert all(r["step"] == 6 and r["buffer"].shape == (20, 2) for r in ranks)
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"]) and torch.isfinite(ranks[0]["weight"]).all()


def test_sam_under_ddp_keeps_ranks_in_step(tmp_path):
    run("sam", tmp_path, 2, 4)
    ranks = [torch.load(tmp_path / f"sam2_end_rank{r}.pt") for r in (0, 1)]
    assert all(r["step"] == 4 for r in ranks)
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"]) and torch.isfinite(ranks[0]["weight"]).all()
    assert not torch.equal(ranks[0]["buffer"], ranks[1]["buffer"])
