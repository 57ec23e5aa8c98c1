"""Checks a model before the registry names it: its files, a load exactly as the server loads it,
one token through the engine, and, where transformers has the architecture, the engine's logprobs
on a short text against transformers' own fp32 forward pass over the same checkpoint.

Knows files, the engine's public contract (load_model, Engine, GenerationRequest) and transformers;
nothing of the registry's text or of argv. Every failure is `Refused` with one sentence.
"""
from __future__ import annotations

import gc
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from amber.config import ModelSpec
from amber.registry_edit import Refused

TEXT = "The quick brown fox jumps over the lazy dog. Amber checks every model before it serves one."
FP32_MAX_DIFF = 1e-3     # nats at any token: float32 must be transformers' forward up to rounding
REDUCED_MEAN_DIFF = 0.5  # nats on average for bfloat16 and the weight-only modes (README: 0.03-0.05)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_PACKAGE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class Fidelity:
    """|engine logprob - transformers' fp32 logprob| over every scored token, in nats."""
    tokens: int
    max_diff: float
    mean_diff: float


@dataclass(frozen=True)
class Checked:
    checkpoint: Path
    model_type: str
    positions: int | None         # the model's max_position_embeddings, where config.json says
    next_token: str               # what the engine generated after TEXT, greedily
    fidelity: Fidelity | None     # None: transformers has no causal LM of this model_type


def source_fields(source: str) -> dict[str, str]:
    """`--from` -> the registry's source keys: a directory -> path, a file -> gguf_path, and
    `package:relative/file.gguf` (when no such file exists here) -> gguf_package + gguf_file."""
    path = Path(source).expanduser()
    if path.is_dir():
        check_checkpoint_dir(path.resolve())
        return {"path": str(path.resolve())}
    if path.is_file():
        _check_gguf(path.resolve())
        return {"gguf_path": str(path.resolve())}
    package, sep, inner = source.partition(":")
    if sep and inner and _PACKAGE.fullmatch(package):
        _check_gguf(_package_file(package, inner))
        return {"gguf_package": package, "gguf_file": inner}
    raise Refused(f"{source} does not exist (give a checkpoint directory, a GGUF file, "
                  "or package:path/inside/it.gguf).")


def convert(spec: ModelSpec, source: str, checkpoints_dir: Path) -> Path:
    """The checkpoint directory of a GGUF-sourced spec, converted now as a server's first start would."""
    from amber.engine.checkpoint import ensure_checkpoint
    try:
        return ensure_checkpoint(spec, checkpoints_dir)
    except Exception as exc:
        raise Refused(f"the GGUF {source} could not be converted; it may be corrupt, truncated, or of an "
                      f"architecture transformers cannot read ({_line(exc)}).") from exc


def check_checkpoint_dir(path: Path) -> dict:
    """Refuse a directory that is not a whole Hugging Face checkpoint; its config.json if it is."""
    config = path / "config.json"
    if not config.is_file():
        raise Refused(f"{path} has no config.json, so it is not a Hugging Face checkpoint directory.")
    try:
        hf = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(f"{config} is not valid JSON ({exc}).") from exc
    if not isinstance(hf, dict) or "model_type" not in hf:
        raise Refused(f"{config} does not name a model_type, so the architecture is unknown.")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise Refused(f"{path} has no *.safetensors weights (Amber reads safetensors only; "
                      "transformers' save_pretrained writes them).")
    from safetensors import safe_open
    for shard in shards:
        try:
            with safe_open(shard, "pt"):
                pass
        except Exception as exc:  # safetensors raises its own error types for a bad header or size
            raise Refused(f"{shard} is corrupt or truncated ({_line(exc)}).") from exc
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise Refused(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}), which serving needs "
                      "to turn text into tokens.")
    return hf


def check_model(spec: ModelSpec, checkpoint: Path) -> Checked:
    """Load `spec` from its checkpoint directory as the server would, generate one token, and
    compare logprobs with transformers; refuse a model that fails any of it."""
    from amber.engine.tokenizer import Tokenizer

    hf = check_checkpoint_dir(checkpoint)
    try:
        tokenizer = Tokenizer.from_pretrained(checkpoint)
    except Exception as exc:
        raise Refused(f"the tokenizer in {checkpoint} does not load ({_line(exc)}).") from exc
    ours, ids, text = _engine_logprobs(spec, checkpoint, tokenizer)
    fidelity = _against_transformers(checkpoint, hf["model_type"], ids, ours)
    if fidelity is not None:
        _judge(spec.dtype, fidelity)
    return Checked(checkpoint, hf["model_type"], hf.get("max_position_embeddings"), text, fidelity)


def _engine_logprobs(spec: ModelSpec, checkpoint: Path, tokenizer) -> tuple[list[float], list[int], str]:
    """The engine's raw logprob of every token of BOS + TEXT + one greedy token, those ids, and
    the token's text. The model is freed before returning, so the reference fits beside nothing."""
    from amber.engine.engine import Engine
    from amber.engine.loader import load_model
    from amber.engine.types import GenerationRequest, SamplingParams

    try:
        model = load_model(checkpoint, spec.dtype, "cpu", tune=False)
    except ValueError as exc:  # the loader's own sentence: an unsupported architecture, a missing weight
        text = str(exc) if str(exc).startswith(str(checkpoint)) else f"{checkpoint}: {exc}"
        raise Refused(_sentence(text)) from exc
    except Exception as exc:
        raise Refused(f"the weights in {checkpoint} do not load ({_line(exc)}).") from exc
    prompt = tokenizer.encode(TEXT)
    try:
        engine = Engine(model, tokenizer, max_batch=1, max_context=len(prompt) + 8, prefix_blocks=0)
    except Exception as exc:
        raise Refused(f"the engine cannot serve {checkpoint} ({_line(exc)}).") from exc
    if engine.bos_id is None:
        raise Refused(f"{checkpoint} names no BOS token (bos_token_id in config.json, or bos_token in "
                      "tokenizer_config.json), and the engine starts every prompt with one.")
    box = []
    try:  # on this thread, as the worker's evaluation runs; a failed step ends the request, not the engine
        engine.submit(GenerationRequest("check", tuple(prompt), SamplingParams(temperature=0, max_tokens=1)),
                      box.append)
        engine.run_until_idle()
    except Exception as exc:
        box[:] = [exc]
    if not box or isinstance(box[0], BaseException):
        raise Refused(f"running one token through {checkpoint} failed ({_line(box[0]) if box else 'no answer'}).")
    out, bos = box[0], engine.bos_id
    completion = out.completions[0]
    del engine, model
    gc.collect()
    ours = [t.raw_logprob for t in out.prompt] + [t.raw_logprob for t in completion.tokens]
    return ours, [bos, *prompt, *(t.token_id for t in completion.tokens)], completion.text


def _against_transformers(checkpoint: Path, model_type: str, ids: list[int], ours: list[float]) -> Fidelity | None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    try:
        reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        with torch.inference_mode():
            logprobs = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    except Exception as exc:
        raise Refused(f"transformers could not run {checkpoint} to compare logprobs ({_line(exc)}).") from exc
    theirs = [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    diff = (torch.tensor(ours, dtype=torch.float64) - torch.tensor(theirs, dtype=torch.float64)).abs()
    return Fidelity(len(theirs), float(diff.max()), float(diff.mean()))


def _judge(dtype: str, f: Fidelity) -> None:
    if dtype == "float32" and f.max_diff > FP32_MAX_DIFF:
        raise Refused(f"in float32 the engine's logprobs differ from transformers' by up to {f.max_diff:.3g} "
                      f"nats (limit {FP32_MAX_DIFF:g}), so Amber does not compute this model faithfully.")
    if dtype != "float32" and f.mean_diff > REDUCED_MEAN_DIFF:
        raise Refused(f"in {dtype} the engine's logprobs differ from transformers' float32 ones by "
                      f"{f.mean_diff:.3g} nats on average (limit {REDUCED_MEAN_DIFF:g}); try a more "
                      "precise --dtype such as float32.")


def _package_file(package: str, inner: str, assemble_dir: Path | None = None) -> Path:
    """The GGUF `inner` of installed package `package`, found as checkpoint.gguf_source finds it."""
    from amber.engine.checkpoint import package_gguf
    try:
        return package_gguf(package, inner, assemble_dir or Path(tempfile.gettempdir()) / "amber-gguf")
    except (ImportError, ValueError) as exc:
        raise Refused(f"no installed Python package is named {package!r} ({_line(exc)}).") from exc
    except FileNotFoundError as exc:
        raise Refused(f"{exc}.") from exc


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise Refused(f"{path} is not a GGUF file (it does not start with 'GGUF'; give a Hugging Face "
                      "checkpoint as its directory).")


def _line(exc: BaseException) -> str:
    """An exception as one short line, for inside a sentence."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300].rstrip(".")


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith(".") else text + "."
