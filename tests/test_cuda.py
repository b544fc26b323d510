"""The GPU paths on a real CUDA device: compiled steps with and without CUDA graphs, bf16 and fp16 training.

Skipped without a GPU (CI has none); run them wherever one is available: ``python -m pytest -q tests/test_cuda.py``.
"""

import lightning.pytorch as pl
import pytest
import torch

from jemkit import JEM, MALA, SGLD, ReplayBuffer
from jemkit.models import SmallCNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pair(**compiled_kwargs):
    sampler = SGLD(n_steps=5, step_size=0.5, noise_std=0.0)
    eager = JEM(SmallCNN(width=8), sampler=sampler).cuda()
    compiled = JEM(SmallCNN(width=8), sampler=sampler, **compiled_kwargs).cuda()
    compiled.classifier.load_state_dict(eager.classifier.state_dict())
    for jem in (eager, compiled):
        jem.setup("fit")
    return eager, compiled


@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_compiled_step_on_cuda_follows_the_eager_chains(mode):
    torch._dynamo.reset()
    eager, compiled = pair(compile=mode)
    x0 = torch.rand(32, 1, 8, 8, device="cuda") * 2 - 1
    for _ in range(3):  # CUDA graphs are recorded after a warm-up call, then replayed
        outputs = [compiled.purify(x0, 5), compiled.purify(x0 * 0.5, 5)]  # an earlier output must stay valid
        torch.testing.assert_close(outputs[0], eager.purify(x0, 5), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(outputs[1], eager.purify(x0 * 0.5, 5), atol=1e-4, rtol=1e-4)


def test_mala_on_cuda():
    jem = JEM(SmallCNN(width=8), sampler=MALA(n_steps=10, step_size=1e-3)).cuda()
    jem.buffer.initialize((1, 8, 8), device="cuda")
    x = jem.sample(16, source="fresh")
    assert x.is_cuda and torch.isfinite(x).all()
    assert 0.0 < float(jem.sampler.acceptance_rate) <= 1.0


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_mixed_precision_training_with_a_compiled_step_on_cuda(tmp_path, precision, mode):
    torch._dynamo.reset()
    jem = JEM(SmallCNN(width=8, num_classes=3), sampler=SGLD(n_steps=3), buffer=ReplayBuffer(capacity=64), compile=mode)
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(32) % 3), batch_size=8)
    pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    ).fit(jem, loader)
    assert torch.isfinite(jem.buffer.samples).all()
