"""A JEM run under ``strategy="ddp"`` on CPU (gloo), driven by tests/test_ddp.py as a subprocess.

    python tests/ddp_worker.py fit    OUT_DIR DEVICES MAX_STEPS
    python tests/ddp_worker.py resume OUT_DIR DEVICES MAX_STEPS
    python tests/ddp_worker.py diverge OUT_DIR DEVICES MAX_STEPS   (rank 1 alone blows up at step 3)

Lightning relaunches this script once per extra rank. Each rank writes what the test checks to
``OUT_DIR/<mode>_rank<r>.pt``.
"""

import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jemkit import JEM, SGLD, ReplayBuffer
from jemkit.callbacks import CalibrationMonitor, DivergenceGuard, OODMonitor, SampleGrid
from jemkit.checkpoint import AtomicCheckpointIO
from jemkit.ood import OODOptions
from jemkit.optim import SAM
from tests.helpers import TinyMLP


class CorruptOnRankOne(Callback):
    """Makes rank 1 alone diverge at one step: the ranks must agree to skip it and roll back together."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == self.step and not getattr(self, "done", False):
            self.done = True
            with torch.no_grad():
                pl_module.classifier.net[-1].weight[0, 0] = float("inf")


class Record(Callback):
    def __init__(self, out: Path, mode: str) -> None:
        self.out, self.mode = out, mode

    def on_train_start(self, trainer, pl_module):
        if self.mode.startswith("resume"):
            self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, pl_module, "end")

    def _dump(self, trainer, pl_module, when):
        guard = next(c for c in trainer.callbacks if isinstance(c, DivergenceGuard))
        torch.save(
            {
                "rollbacks": guard.rollbacks,
                "buffer": pl_module.buffer.samples.cpu(),
                "step": trainer.global_step,
                "world_size": trainer.world_size,
                "weight": pl_module.classifier.net[1].weight.detach().cpu(),
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            },
            self.out / f"{self.mode}_{when}_rank{trainer.global_rank}.pt",
        )


def main(mode: str, out: str, devices: int, max_steps: int) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    pl.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(22)
    x = torch.randn(66, 2, generator=generator) * 0.1 + torch.stack([torch.cos(y * 2.0), torch.sin(y * 2.0)], 1) * 0.6
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    sam = partial(SAM, base="adam", rho=0.05, lr=1e-2) if mode == "sam" else None  # two evaluations per step
    jem = JEM(
        TinyMLP(), sampler=SGLD(n_steps=2, step_size=0.01), buffer=ReplayBuffer(capacity=40), lr=1e-2, optimizer=sam
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp",
        max_steps=max_steps,
        default_root_dir=out_dir,
        logger=CSVLogger(out_dir, name=f"logs_{mode}_{devices}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(dirpath=out_dir / "ckpt", save_last=True, every_n_train_steps=2),
            CalibrationMonitor(),
            OODMonitor(OODOptions(sets=["uniform"]), max_samples=32),
            SampleGrid(num_samples=16),
            DivergenceGuard(action="rollback", snapshot_every_n_steps=2),
            Record(out_dir, f"{mode}{devices}"),
            *([CorruptOnRankOne(step=3)] if mode == "diverge" else []),
        ],
    )
    ckpt_path = out_dir / "ckpt" / "last.ckpt" if mode == "resume" else None
    trainer.fit(jem, loader, loader, ckpt_path=ckpt_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
