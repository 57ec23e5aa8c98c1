"""A training run's epochs in storage: one complete checkpoint per epoch, and resuming from them.

Layout, within the run's storage (the worker's is `custom-models/ID` in shared storage,
amber/files): `epoch-N/` holds a standard PEFT adapter (adapter_config.json,
adapter_model.safetensors), `epoch.json` (this epoch's losses and the run's identity) and, for the
newest epoch only, `trainer_state.pt` (optimizer and scheduler) to resume from. Each epoch is
written to a local temporary directory, then put into storage whole (`Storage.put_dir`), so a
process killed at any moment leaves either a complete epoch or none, and a worker on any host
resumes after the last complete one. Knows nothing of data, losses or the training loop.
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load as load_safetensors

from amber.files import layout
from amber.files.storage import Storage
from amber.training.data import TrainingError

STATE = "trainer_state.pt"
RECORD = "epoch.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass
class EpochResult:
    epoch: int
    train_loss: float              # mean completion-token NLL over the epoch's training steps
    validation_loss: float | None  # mean completion-token NLL on validation rows; None without any
    key: str                       # this epoch's adapter directory in the run's storage
    seconds: float                 # wall time of the epoch's steps and validation


def completed_epochs(out: Storage, run: dict) -> list[EpochResult]:
    """Results of the epochs already in `out`, in order. `run` identifies the run (settings and
    data); epochs of another run are refused rather than silently continued."""
    results = []
    while out.exists(key := layout.epoch(len(results) + 1)):
        with out.open(f"{key}/{RECORD}") as file:
            record = json.load(file)
        if record["run"] != run:
            raise TrainingError(f"{out} holds epochs of a different training run (other settings or data); "
                                "resume with the same ones or use an empty directory")
        results.append(EpochResult(**record["result"], key=key))
    return results


def restore(out: Storage, key: str, model: PeftModel, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Put the adapter weights, optimizer and scheduler back as they were when epoch `key` was saved."""
    with out.open(f"{key}/{WEIGHTS}") as file:
        set_peft_model_state_dict(model, load_safetensors(file.read()))
    with out.open(f"{key}/{STATE}") as file:
        state = torch.load(io.BytesIO(file.read()), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def save_epoch(out: Storage, result: EpochResult, run: dict, model: PeftModel,
               optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Write epoch `result.epoch` atomically, then drop the previous epoch's optimizer state,
    which nothing needs once a newer epoch can be resumed from."""
    tmp = Path(tempfile.mkdtemp(prefix=f"amber-epoch-{result.epoch}-"))  # 0700, as AMBER_HOME keeps all
    try:
        model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / STATE)
        fields = {k: v for k, v in asdict(result).items() if k != "key"}
        (tmp / RECORD).write_text(json.dumps({"run": run, "result": fields}, indent=1))
        out.put_dir(result.key, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if result.epoch > 1:
        out.delete(f"{layout.epoch(result.epoch - 1)}/{STATE}")
