"""LoRA fine-tuning of a base checkpoint into a custom model: `train_lora` and its settings.

Owns: the PEFT setup (plain LoRA on the linear layers the model family names for adapters,
`peft_targets` in amber/engine/models/, every projection of the decoder; no rsLoRA or DoRA, because
serving computes W x + (alpha / r) B A x), the training loop, per-epoch losses, progress with an ETA,
and resuming. Data layout lives in `data.py`, the output directory in `epochs.py`.

Where the speed comes from on CPU (see bench/train_sst2.py for the measurements):
- The LM head and the loss run only at completion positions. The vocabulary is 49,152 wide, so
  logits over every prompt position would be a large share of the FLOPs and memory for nothing.
- The frozen base is held in bfloat16 (AMX/AVX-512 bf16 matmuls); LoRA weights, their gradients and
  the optimizer stay in float32, and PEFT adds the LoRA term in float32.
- Batches group examples of similar length (right padding, attention mask), so little is padding.
- Eager attention for short batches (see `attention_for`), and no LoRA dropout by default: at these
  sizes SDPA's CPU backward and dropout's random masks cost more than the matmuls they serve.

Deterministic for a given seed on one machine: each epoch reseeds its shuffle and dropout from
(seed, epoch), so an interrupted run resumed from its last epoch ends with the same adapter.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from amber.engine.models import family_for
from amber.files import layout
from amber.files.local import LocalStorage
from amber.files.storage import Storage
from amber.training.data import (Batch, Example, ExampleEncoder, TokenizedExample, TrainingError,
                                 bucketed_batches, collate, fingerprint)
from amber.training.defaults import DEFAULT_EPOCHS, DEFAULT_LEARNING_RATE
from amber.training.epochs import EpochResult, completed_epochs, restore, save_epoch

__all__ = ["Example", "TrainConfig", "Progress", "EpochResult", "TrainingError", "train_lora", "target_modules"]

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# On CPU, eager attention (plain matmuls) trains short rows faster than SDPA's flash kernel, whose
# backward is slow for small blocks; but eager keeps (batch, heads, seq, seq) probabilities for the
# backward pass, so batches whose probabilities would pass this many bytes over all layers use SDPA.
EAGER_ATTENTION_BYTES = 1 << 30


@dataclass(frozen=True)
class TrainConfig:
    """Defaults chosen by measurement on SST-2 with SmolLM2-135M-Instruct (bench/train_sst2.py)."""
    rank: int = 16                    # rank 8 scored the same; 16 leaves room for harder tasks
    alpha: float = 32.0               # serving scales B A x by alpha / rank
    dropout: float = 0.0              # 0.05 cost ~25% of step time (random masks), no accuracy gain
    learning_rate: float = DEFAULT_LEARNING_RATE  # 2e-3 lost 10 points, 5e-4 the same as 1e-3
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 8               # 4: slower, no better; 16: hardly faster on 2 cores
    weight_decay: float = 0.0
    warmup_steps: int = 2             # then linear decay to zero at the last step
    max_grad_norm: float = 1.0
    max_length: int | None = None     # tokens per example; None: the model's own limit
    seed: int = 0
    base_dtype: str = "bfloat16"      # frozen base weights; "float32" is slower and was no better


@dataclass
class Progress:
    epoch: int
    epochs: int
    step: int            # optimizer steps done, over the whole run (resumed epochs included)
    total_steps: int
    loss: float          # this step's mean completion-token loss
    elapsed_seconds: float
    eta_seconds: float   # remaining steps at this call's average pace so far


def train_lora(checkpoint: Path, train: Sequence[Example], validation: Sequence[Example],
               config: TrainConfig, out: Storage | Path,
               on_progress: Callable[[Progress], None] | None = None,
               on_epoch: Callable[[EpochResult], None] | None = None) -> list[EpochResult]:
    """Train a LoRA adapter on `train`, writing `epoch-N/` (a PEFT adapter) into `out` (a storage,
    or a local directory) after each epoch; returns every epoch's result. If `out` already holds
    epochs of this same run, training resumes after the last of them. Raises TrainingError for
    problems the caller can act on."""
    if not train:
        raise TrainingError("there are no training examples")
    if config.base_dtype not in DTYPES:
        raise TrainingError(f"base_dtype must be one of {sorted(DTYPES)}")
    encoder = ExampleEncoder(checkpoint, config.max_length)
    train_set = encoder.encode_all(train, "training")
    validation_set = encoder.encode_all(validation, "validation")
    out = LocalStorage(out) if isinstance(out, Path) else out
    run = {"config": asdict(config), "train": fingerprint(train_set), "validation": fingerprint(validation_set)}
    results = completed_epochs(out, run)[:config.epochs]
    if len(results) == config.epochs:
        return results

    torch.manual_seed(config.seed)  # the LoRA A initialisation
    model = load_model(checkpoint, config)
    causal = model.get_base_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(config.warmup_steps, total_steps))
    if results:
        restore(out, results[-1].key, model, optimizer, scheduler)

    began, steps_here = time.perf_counter(), 0
    lengths = [len(ex.ids) for ex in train_set]
    for epoch in range(len(results) + 1, config.epochs + 1):
        epoch_began = time.perf_counter()
        model.train()
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout, independent of earlier epochs
        shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        nll_sum, token_count = 0.0, 0
        for indices in bucketed_batches(lengths, config.batch_size, shuffle):
            batch = collate([train_set[i] for i in indices], encoder.eos_id)
            nll = completion_nll(causal, batch)
            loss = nll / len(batch.targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            nll_sum, token_count = nll_sum + nll.item(), token_count + len(batch.targets)
            steps_here += 1
            if on_progress:
                step, elapsed = scheduler.last_epoch, time.perf_counter() - began
                on_progress(Progress(epoch, config.epochs, step, total_steps, loss.item(), elapsed,
                                     elapsed / steps_here * (total_steps - step)))
        result = EpochResult(epoch, nll_sum / token_count,
                             validation_loss(causal, validation_set, config.batch_size, encoder.eos_id),
                             layout.epoch(epoch), 0.0)
        result.seconds = time.perf_counter() - epoch_began
        save_epoch(out, result, run, model, optimizer, scheduler)
        results.append(result)
        if on_epoch:
            on_epoch(result)
    return results


def target_modules(checkpoint: Path) -> tuple[str, ...]:
    """The PEFT target_modules of the checkpoint's model family: the projections serving adapts."""
    model_type = json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    try:
        return family_for(model_type).peft_targets
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def load_model(checkpoint: Path, config: TrainConfig) -> PeftModel:
    """The base model with fresh LoRA layers; only the LoRA weights train, and they stay float32
    (PEFT upcasts adapter weights created beside a bfloat16 base)."""
    targets = target_modules(checkpoint)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[config.base_dtype])
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def completion_nll(causal: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Summed NLL of the batch's completion tokens. The LM head runs only where a loss token is
    predicted, never over the prompt. `causal`: a transformers *ForCausalLM (any family)."""
    attention = attention_for(causal.config, *batch.input_ids.shape)
    if attention == "sdpa" and not causal._supports_sdpa:  # GPT-J has only its eager attention
        attention = "eager"
    causal.set_attn_implementation(attention)
    hidden = causal.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               use_cache=False).last_hidden_state      # (batch, seq, hidden)
    logits = causal.lm_head(hidden[batch.rows, batch.positions])        # (targets, vocab)
    return F.cross_entropy(logits.float(), batch.targets, reduction="sum")


@torch.no_grad()
def validation_loss(causal: PreTrainedModel, examples: Sequence[TokenizedExample], batch_size: int,
                    pad_id: int) -> float | None:
    """Mean completion-token NLL, dropout off; batches in length order, as padding is wasted work."""
    if not examples:
        return None
    causal.eval()
    ordered = sorted(examples, key=lambda ex: len(ex.ids))
    batches = [collate(ordered[b:b + batch_size], pad_id) for b in range(0, len(ordered), batch_size)]
    total = sum(completion_nll(causal, batch).item() for batch in batches)
    return total / sum(len(batch.targets) for batch in batches)


def attention_for(config, batch: int, seq: int) -> str:
    """"eager" while its saved attention probabilities stay under EAGER_ATTENTION_BYTES, else "sdpa"."""
    # float32 softmax output plus its bfloat16 copy: 6 bytes per attention probability.
    probabilities = batch * config.num_attention_heads * seq * seq * config.num_hidden_layers
    return "eager" if probabilities * 6 <= EAGER_ATTENTION_BYTES else "sdpa"


def warmup_then_linear(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over the first steps, then linear decay to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor
