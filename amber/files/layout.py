"""The keys of Amber's shared files: one place that names them.

    datasets/ID/                    upload.jsonl (.csv, .tsv: the file as uploaded), rows.jsonl
    custom-models/ID/epoch-N/       a PEFT adapter, epoch.json, the newest epoch's trainer_state.pt

Under AMBER_SHARED_DIR (else AMBER_HOME) these are the directories of old, so a home keeps working.
"""
from __future__ import annotations

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what serving and export read


def dataset(dataset_id: int) -> str:
    return f"datasets/{dataset_id}"


def custom_model(model_id: int) -> str:
    """A training run's output: its epochs (amber/training/epochs.py)."""
    return f"custom-models/{model_id}"


def epoch(number: int) -> str:
    """An epoch's directory within its run's."""
    return f"epoch-{number}"


def adapter(model_id: int, number: int) -> str:
    return f"{custom_model(model_id)}/{epoch(number)}"
