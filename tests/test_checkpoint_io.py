from io import BytesIO

import pytest
import torch

from jemkit.checkpoint import AtomicCheckpointIO, load_checkpoint_file, upgraded_hyper_parameters
from jemkit.sampling import ReplayBuffer
from tests.helpers import TinyMLP


def test_atomic_save_writes_and_replaces(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    io.save_checkpoint({"step": 2}, path)
    assert torch.load(path)["step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_crash_while_saving_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1  # the previous complete checkpoint survives
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # and no temporary file is left


class Payload:
    """Pickles as a call that creates ``marker``: what a malicious checkpoint would run when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _checkpoint_with_a_payload(tmp_path):
    """A Lightning checkpoint of a JEM whose hyper-parameters carry a pickle payload; the payload's marker file."""
    from jemkit import JEM
    from tests.helpers import toy_loader, trainer

    jem = JEM(TinyMLP(), buffer=ReplayBuffer(capacity=16))
    tr = trainer(tmp_path, max_steps=1)
    tr.fit(jem, toy_loader())
    path, marker = tmp_path / "downloaded.ckpt", tmp_path / "payload-ran"
    tr.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    torch.save(checkpoint, path)
    return path, marker


def test_a_checkpoint_with_a_pickle_payload_is_refused_in_one_line_and_nothing_runs(tmp_path):
    from jemkit import JEM

    path, marker = _checkpoint_with_a_payload(tmp_path)
    with pytest.raises(ValueError) as error:
        load_checkpoint_file(path, "cpu", trust_hint="--weights_only false")
    message = str(error.value)
    assert message.startswith(f"{path} is unsafe to load") and "(exec)" in message and "\n" not in message
    assert message.endswith("If you trust its source, load it with --weights_only false")
    with pytest.raises(ValueError, match=r"unsafe to load.*JEM\.load_from_checkpoint\(path, weights_only=False\)"):
        JEM.load_from_checkpoint(path, classifier=TinyMLP())
    assert not marker.exists()
    load_checkpoint_file(path, "cpu", weights_only=False)  # trusted on purpose: the payload runs
    assert marker.exists()


def test_a_truncated_checkpoint_is_named_by_the_loader(tmp_path):
    path = tmp_path / "cut.ckpt"
    buffer = BytesIO()
    torch.save({"state_dict": {"w": torch.ones(100)}}, buffer)
    path.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ValueError, match=r"cut\.ckpt is truncated or corrupted"):
        load_checkpoint_file(path)


@pytest.mark.slow
def test_resuming_from_a_checkpoint_with_a_pickle_payload_is_refused_by_the_command_line(tmp_path, capsys):
    from jemkit.cli import main

    path, marker = _checkpoint_with_a_payload(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "recipes/digits.yaml", "--ckpt_path", str(path), "--trainer.max_steps", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"jemkit: error: {path} is unsafe to load") and "--weights_only false" in err
    assert "Traceback" not in err and not marker.exists()


def test_upgraded_hyper_parameters_fold_the_0_1_names_into_weights():
    legacy = {"px_weight": "px", "ce_weight": "ce"}
    assert upgraded_hyper_parameters({"px_weight": 0.1, "lr": 1e-3}, legacy) == {"lr": 1e-3, "weights": {"px": 0.1}}
    new = {"weights": {"px": 0.3}, "lr": 1e-3}
    assert upgraded_hyper_parameters(new, legacy) == new
