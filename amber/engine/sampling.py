"""Sampling: a pure function of logits and per-row parameters, in one fixed order.

    raw logprobs  = log_softmax(logits)                              (the model's own distribution)
    adjusted      = logits + logit_bias
                    - presence * [n > 0] - count * n - frequency * n / L   (per penalty, only where it applies)
                    ; end-of-text banned (-inf) before minTokens
    temperature 0 : the token is argmax(adjusted); reported logprobs are log_softmax(adjusted).
                    Any temperature below MIN_TEMPERATURE is greedy too (dividing by 1e-38
                    overflows float32; below 1e-5 a draw is argmax in all but name).
    temperature t : scaled = adjusted / t; top-p keeps the smallest most-likely set whose mass
                    reaches top_p (top_p 0: the most likely token alone); reported logprobs are
                    log_softmax over that set, and the token is drawn from exactly that
                    distribution with the row's own generator.

n counts a token's occurrences in the prompt and the completion so far, L their total length
(AI21's penalties count both, unlike OpenAI's). Nothing here knows about requests or text.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from amber.engine.types import Penalty


MIN_TEMPERATURE = 1e-5  # temperatures below this sample greedily (vLLM's epsilon, too)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors; row b of every field belongs to one sequence."""
    temperature: torch.Tensor        # (batch,) float; 0 = greedy
    top_p: torch.Tensor              # (batch,) float in [0, 1]; 0 keeps the most likely token only
    penalty_scales: torch.Tensor | None  # (batch, 3) presence, count, frequency; None: no row has any
    penalty_masks: torch.Tensor | None   # (batch, 3, vocab) float: 1 where that penalty applies
    bias: torch.Tensor | None        # (batch, vocab) added to logits, or None
    banned: torch.Tensor | None      # (2, k) long: row and token of each forbidden pair (end-of-text
                                     # before minTokens): a few tokens, not a (batch, vocab) mask


@dataclass
class Sampled:
    token_ids: torch.Tensor          # (batch,) long
    logprobs: torch.Tensor           # (batch, vocab) the distribution each token was drawn from
    raw_logprobs: torch.Tensor       # (batch, vocab) the model's own


def penalty_mask(penalty: Penalty, category_masks: torch.Tensor) -> torch.Tensor:
    """(vocab,) float: 1 where `penalty` applies, 0 for tokens of a category it exempts."""
    exempt = torch.zeros(category_masks.shape[1], dtype=torch.bool, device=category_masks.device)
    for category, applies in enumerate(penalty.apply_to):
        if not applies:
            exempt |= category_masks[category]
    return (~exempt).float()


def adjust_logits(logits: torch.Tensor, batch: SamplingBatch, counts: torch.Tensor | None,
                  lengths: torch.Tensor) -> torch.Tensor:
    """Bias, penalties and bans applied to fp32 logits (batch, vocab); counts (batch, vocab), or
    None when no row has a penalty. Returns `logits` itself when nothing applies."""
    out = logits if batch.bias is None else logits + batch.bias
    if batch.penalty_scales is not None and bool(batch.penalty_scales.any()):
        per_token = torch.stack([
            (counts > 0).float(),                                  # presence
            counts,                                                # count
            counts / lengths.clamp(min=1).unsqueeze(-1).float(),   # frequency
        ], dim=1)  # (batch, 3, vocab)
        out = out - (batch.penalty_scales.unsqueeze(-1) * batch.penalty_masks * per_token).sum(1)
    if batch.banned is not None:  # a few entries set: a (batch, vocab) masked_fill cost ~0.2 ms at 8 rows
        out = out.clone() if out is logits else out
        out[batch.banned[0], batch.banned[1]] = float("-inf")
    return out


def top_p_filter(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside each row's nucleus. The most likely token always stays
    (so top_p 0 keeps it alone)."""
    probs = scaled.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop_sorted = mass_before >= top_p.unsqueeze(-1)
    drop_sorted[:, 0] = False
    drop_sorted &= (top_p < 1.0).unsqueeze(-1)  # top_p = 1 keeps everything, rounding aside
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, batch: SamplingBatch, counts: torch.Tensor | None, lengths: torch.Tensor,
           generators: list[torch.Generator]) -> Sampled:
    """Choose one token per row. logits: (batch, vocab) fp32; lengths: tokens so far per row."""
    raw = logits.log_softmax(-1)
    adjusted = adjust_logits(logits, batch, counts, lengths)
    greedy = batch.temperature < MIN_TEMPERATURE
    if bool(greedy.all()):  # what the general path below computes for greedy rows, in fewer ops
        logprobs = raw if adjusted is logits else adjusted.log_softmax(-1)
        return Sampled(token_ids=argmax(adjusted), logprobs=logprobs, raw_logprobs=raw)
    temperature = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
    scaled = adjusted / temperature.unsqueeze(-1)
    nucleus = (~greedy & (batch.top_p < 1)).nonzero().flatten()
    if len(nucleus):  # sorting the vocabulary costs ~2 ms a row: only rows that need top-p pay it
        scaled[nucleus] = top_p_filter(scaled[nucleus], batch.top_p[nucleus])
    logprobs = scaled.log_softmax(-1)
    drawn = (~greedy).nonzero().flatten()
    if len(drawn) == len(greedy):  # every row draws (numResults > 1 sampling): no copies, no argmax
        chosen = draw(logprobs, generators)
    else:
        chosen = argmax(adjusted)
        chosen[drawn] = draw(logprobs[drawn], [generators[row] for row in drawn.tolist()])
    return Sampled(token_ids=chosen, logprobs=logprobs, raw_logprobs=raw)


DRAW_FLOOR = -80.0  # e^-80 = 1.8e-35: the smallest probabilities a draw keeps, still normal floats
BLOCK = 256         # tokens per block of draw's two-level inversion


def draw(logprobs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of logprobs (rows, vocab), each from its row's generator, by inverting
    the cumulative distribution at one uniform draw (`invert`). torch.multinomial draws one
    exponential per vocabulary entry from the generator instead (~1 ms a row for 49,152 tokens)."""
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=g, device=g.device) for g in generators])
    return invert(logprobs, u.to(logprobs.device))


def invert(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row b's token: the first whose cumulative probability exceeds u[b] (in [0, 1)) times the
    row's total, in float64, so that rounding cannot shift mass between tokens (a float32 cumsum
    over 49,152 tokens would lose every token under ~6e-8). In two levels: the block of BLOCK
    tokens whose cumulative sums bracket the target, then the token within it; one float64 cumsum
    over the whole vocabulary cost ~0.8 ms at 8 rows of 49,152 tokens.

    Tokens under DRAW_FLOOR are drawn as impossible: at most 49,152 x 1.8e-35 of the mass, far
    below float64's resolution of the sum, while as subnormal floats they made every operation on
    them ~100x slower (a peaked distribution at temperature 0.7 has thousands: 8 rows took 5 ms).
    The probabilities are softmax's of what is left (its vectorised exp is ~2x torch.exp's); the
    total it divides by cancels in u times the row's total."""
    rows, vocab = logprobs.shape
    probs = F.threshold(logprobs, DRAW_FLOOR, float("-inf")).softmax(-1)
    if vocab % BLOCK:
        probs = F.pad(probs, (0, -vocab % BLOCK))  # zeros: never drawn
    blocks = probs.view(rows, -1, BLOCK)
    # each block's sum in float32 (casting the vocabulary to float64 first cost ~0.25 ms at 8 rows):
    # a block's mass off by ~1e-7 of itself, the rounding the probabilities already carry
    sums = blocks.sum(-1).double()
    cdf = sums.cumsum(-1)
    target = u * cdf[:, -1]
    block = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    # u * total can round up to the total itself: past every block; the row takes its last block
    # with any mass, and in it (past its tokens' sum) its last possible token
    last = cdf.shape[1] - 1 - (sums.flip(-1) > 0).int().argmax(-1)
    block = torch.where(block < cdf.shape[1], block, last)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    inside = blocks[torch.arange(rows, device=probs.device), block].double()  # (rows, BLOCK)
    within = torch.searchsorted(inside.cumsum(-1), (target - before).unsqueeze(-1), right=True).squeeze(-1)
    # past the block's tokens (its own sum rounds apart from cdf's): its last possible token
    within = torch.where(within < BLOCK, within, BLOCK - 1 - (inside.flip(-1) > 0).int().argmax(-1))
    return block * BLOCK + within


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest index, as argmax; max's indices cost a third of argmax's on CPU
    (49,152 logits: ~25 us against ~70)."""
    return logits.max(-1).indices


def top_alternatives(logprobs: torch.Tensor, k: int) -> list[tuple[tuple[int, float], ...]]:
    """The k most likely tokens of each row, best first; impossible (-inf) ones left out."""
    if k <= 0:
        return [() for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(k, dim=-1)
    return [tuple((i, v) for i, v in zip(row_ids, row_vals) if v != float("-inf"))
            for row_ids, row_vals in zip(ids.tolist(), values.tolist())]


def make_generator(seed: int | None, index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Row `index` of a request: seeded rows reproduce whatever else shares the batch."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed((seed * 1_000_003 + index) % (2**63))
    return g
