"""The output directory of a training run: one complete checkpoint per epoch, and resuming from them.

Layout: `out_dir/epoch-N/` holds a standard PEFT adapter (adapter_config.json,
adapter_model.safetensors), `epoch.json` (this epoch's losses and the run's identity) and, for the
newest epoch only, `trainer_state.pt` (optimizer and scheduler) to resume from. Each epoch is
written into a hidden temporary directory and renamed into place, so a process killed at any
moment leaves either a complete epoch or none: an `epoch-N` directory is complete by existing.
Knows nothing of data, losses or the training loop.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from amber.training.data import TrainingError

STATE = "trainer_state.pt"
RECORD = "epoch.json"


@dataclass
class EpochResult:
    epoch: int
    train_loss: float              # mean completion-token NLL over the epoch's training steps
    validation_loss: float | None  # mean completion-token NLL on validation rows; None without any
    path: Path                     # this epoch's adapter directory
    seconds: float                 # wall time of the epoch's steps and validation


def epoch_dir(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"epoch-{epoch}"


def completed_epochs(out_dir: Path, run: dict) -> list[EpochResult]:
    """Results of the epochs already in `out_dir`, in order. `run` identifies the run (settings and
    data); a directory from another run is refused rather than silently continued."""
    for stale in out_dir.glob(".epoch-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    results = []
    while (path := epoch_dir(out_dir, len(results) + 1)).is_dir():
        record = json.loads((path / RECORD).read_text())
        if record["run"] != run:
            raise TrainingError(f"{out_dir} holds epochs of a different training run (other settings "
                                f"or data); resume with the same ones or use an empty directory")
        results.append(EpochResult(**record["result"], path=path))
    return results


def restore(path: Path, model: PeftModel, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Put the adapter weights, optimizer and scheduler back as they were when `path` was saved."""
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    state = torch.load(path / STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def save_epoch(out_dir: Path, result: EpochResult, run: dict, model: PeftModel,
               optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Write epoch `result.epoch` atomically, then drop the previous epoch's optimizer state,
    which nothing needs once a newer epoch can be resumed from."""
    tmp = Path(tempfile.mkdtemp(prefix=f".epoch-{result.epoch}-", dir=out_dir))  # 0700, as AMBER_HOME keeps all
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / STATE)
    fields = {k: v for k, v in asdict(result).items() if k != "path"}
    (tmp / RECORD).write_text(json.dumps({"run": run, "result": fields}, indent=1))
    for file in tmp.iterdir():  # on disk before the rename makes them visible as complete
        _fsync(file)
    os.rename(tmp, result.path)
    _fsync(out_dir)
    (epoch_dir(out_dir, result.epoch - 1) / STATE).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
