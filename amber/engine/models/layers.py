"""What every family's model shares: the top level (`CausalLM`: embeddings, layers, final norm and
LM head, and the forward preamble that turns a batch into what each layer reads), the attention
masks over a batch's cache rows, rotate-half RoPE, and the per-row LoRA update. `lora_add` is
TorchScript-compatible, since llama_decode.py's scripted decode step calls it too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine.kv_cache import BatchCache, KVCache

if TYPE_CHECKING:
    from amber.engine.lora import LoraBatch


@dataclass
class LayerInputs:
    """What a layer reads besides the hidden states, worked out once per forward pass."""
    cache: BatchCache
    mask: torch.Tensor | None  # attention_mask's
    cos: torch.Tensor | None   # (tokens, 1, rotary dims), in the residual stream's dtype; None: no RoPE
    sin: torch.Tensor | None   # the same, with rotate-half's (or rotate-every-two's) negation folded in
    window: int = 0            # the sliding window `mask` applies, 0 for none (attend's kernel path)


class Decoder(nn.Module):
    """The shared layout under `model.`: embed_tokens, layers, norm."""

    def __init__(self, vocab_size: int, hidden_size: int, layers: list[nn.Module], norm: nn.Module):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class CausalLM(nn.Module):
    """A family's model: `model` (Decoder) and `lm_head`, tied to the embeddings when the config
    says so. A family builds its layers and final norm and keeps its position tables as buffers
    (`position_tables`); the forward is the same for all. Layers take (x, LayerInputs, lora), x as
    (tokens, hidden). By default every layer attends causally to its whole context and rotates by
    the `rope_cos` / `rope_sin` tables; a family whose layers differ says so in `layer_inputs`."""

    def __init__(self, cfg: Any, layers: list[nn.Module], norm: nn.Module, head_bias: bool = False):
        super().__init__()
        self.config = cfg
        self.kv_dtype: torch.dtype | None = None  # KV cache and attention dtype; None: the weights'
        self.kernels: dict = {}  # layer shape -> kernels.Choice, when kernels.tune chose them
        self.model = Decoder(cfg.vocab_size, cfg.hidden_size, layers, norm)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_buffers()

    def position_tables(self) -> dict[str, torch.Tensor]:
        """Buffer name -> fp32 table made from the config alone (RoPE's): none by default."""
        return {}

    def init_buffers(self) -> None:
        """(Re)make the position tables on the CPU, in fp32: the loader builds the model on meta."""
        for name, table in self.position_tables().items():
            self.register_buffer(name, table, persistent=False)

    @property
    def activation_dtype(self) -> torch.dtype:
        """The residual stream's dtype: the rows the embedding returns (quantize.py may keep the
        table itself as int8)."""
        embedding = self.model.embed_tokens
        return embedding.weight.dtype if isinstance(embedding, nn.Embedding) else embedding.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def layer_inputs(self, positions: torch.Tensor, cache: BatchCache, dtype: torch.dtype) -> list[LayerInputs]:
        """Per layer, what it reads besides the hidden states (in `dtype`, the residual stream's)."""
        inputs = LayerInputs(cache, attention_mask(positions, cache.context),
                             *gather_rows(self.rope_cos, self.rope_sin, positions, dtype))
        return [inputs] * len(self.model.layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | slice, lora: LoraBatch | None = None) -> torch.Tensor:
        """Hidden states (batch, seq, hidden) after the final norm.

        input_ids, positions: (batch, seq), each row's positions contiguous and increasing;
        slots: the cache slot of each row, (batch,), or a slice for consecutive slots (no gather).
        Row b attends to its slot's positions <= its own. `lora`: the rows' adapters, if any has one.
        """
        # Rows travel as (tokens, hidden): every layer but attention treats tokens alike, and the
        # matmul kernels take 2-D inputs, so no reshape is paid per projection.
        x = self.embed(input_ids.flatten())
        batch = cache.batch(slots, positions)
        for layer, inputs in zip(self.model.layers, self.layer_inputs(positions, batch, x.dtype)):
            x = layer(x, inputs, lora)
        return self.model.norm(x).view(*input_ids.shape, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits in fp32, whatever the weights' dtype."""
        return self.lm_head(hidden).float()


def attend(cache: BatchCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None, scale: float | None = None, window: int = 0) -> torch.Tensor:
    """Attention of one layer, as every family's runs it: store k, v (tokens, kv_heads, head_dim) at
    the rows' positions in the cache, then attend each row's queries q (tokens, heads, head_dim) to
    its positions' keys and values (`mask`: attention_mask's; `window`: the same sliding window, 0
    for none). q, k and v arrive in the residual stream's dtype and attention runs in the cache's,
    which may be below it. `scale`: None for 1/sqrt(head_dim). Returns (tokens, heads * head_dim).
    A decode step (one query per row) runs `paged_attend`, as Llama's scripted decode step does."""
    batch, seq = cache.shape
    heads, head_dim = q.shape[1], q.shape[2]
    k, v, q = k.to(cache.dtype), v.to(cache.dtype), q.to(cache.dtype)
    index = cache.cache.attention_index[layer]
    pools = cache.cache.layer_keys[index], cache.cache.layer_values[index]
    if seq == 1:
        return paged_attend(q, k, v, *pools, cache.write_rows, cache.decode_rows, mask, *cache.tables,
                            cache.cache.block_size, cache.kernel, scale, window)
    keys, values = cache.write_and_read(layer, k, v)
    q = q.view(batch, seq, heads, head_dim).transpose(1, 2)  # (batch, heads, seq, head_dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=heads != k.shape[1])
    return out.transpose(1, 2).reshape(batch * seq, -1)


def paged_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pool: torch.Tensor,
                 value_pool: torch.Tensor, write_rows: torch.Tensor, read_rows: torch.Tensor,
                 mask: Optional[torch.Tensor], tables: torch.Tensor, lengths: torch.Tensor, block_size: int,
                 kernel: bool, scale: Optional[float], window: int) -> torch.Tensor:
    """One new token per row (a decode step): q (batch, heads, head_dim), k and v (batch, kv_heads,
    head_dim), all in the pools' dtype. Writes k and v at `write_rows` (kv_cache.BatchCache's), then
    attends: with `kernel`, by the compiled kernel over the rows' block tables and lengths, reading
    the blocks in place (paged_ops.py); otherwise by gathering each row's `read_rows` (batch *
    context) and SDPA under `mask`. Returns (batch, heads * head_dim). TorchScript-compatible:
    llama_decode.py's scripted step runs it too."""
    key_pool.index_copy_(0, write_rows, k)
    value_pool.index_copy_(0, write_rows, v)
    batch, heads, head_dim = q.shape[0], q.shape[1], q.shape[2]
    if kernel:
        out = torch.ops.amber.paged_decode_attention(q, key_pool, value_pool, tables, lengths, block_size,
                                                     head_dim ** -0.5 if scale is None else scale, window)
        return out.reshape(batch, heads * head_dim)
    context, kv_heads = read_rows.shape[0] // batch, k.shape[1]
    keys = key_pool.index_select(0, read_rows).view(batch, context, kv_heads, head_dim).transpose(1, 2)
    values = value_pool.index_select(0, read_rows).view(batch, context, kv_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.view(batch, 1, heads, head_dim).transpose(1, 2), keys, values,
                                         attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).reshape(batch, heads * head_dim)


def attention_mask(positions: torch.Tensor, context: int, window: int | None = None) -> torch.Tensor | None:
    """(batch, 1, seq, context) bool, key j visible to query t when j <= positions[b, t] and, with
    a sliding `window`, positions[b, t] - window < j (Hugging Face's sliding_window_overlay). None
    when every row is one query that sees its whole context (single-sequence decode needs no mask)."""
    if positions.shape == (1, 1) and (window is None or context <= window):
        return None
    keys, queries = torch.arange(context, device=positions.device), positions.unsqueeze(-1)
    visible = keys <= queries
    if window is not None:
        visible &= keys > queries - window
    return visible.unsqueeze(1)


def inverse_frequencies(theta: float, dim: int) -> torch.Tensor:
    """RoPE's default frequencies, (dim / 2,) fp32, as transformers computes them."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin, (positions, head_dim) fp32, for rotate-half RoPE (`apply_rope`)."""
    angles = positions.float()[:, None] * inv_freq  # transformers' product, so the same fp32 angles
    sin = angles.sin()
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, 1, head_dim) in x's dtype, with sin's first
    half negated. HF's rotate-half layout."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat([x[..., half:], x[..., :half]], dim=-1), sin)


def gather_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables' rows at `positions` (batch, seq), as (tokens, 1, dims) in `dtype`."""
    at = positions.flatten()
    return cos[at].unsqueeze(1).to(dtype), sin[at].unsqueeze(1).to(dtype)


def with_lora(lora: LoraBatch | None, layer: int, target: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = W x of projection `target`, plus each adapter row's low-rank update when there is one."""
    return y if lora is None else lora.add(layer, target, x, y)


def lora_add(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bts: List[torch.Tensor], layer: int,
             mask: Optional[torch.Tensor], lanes: Optional[torch.Tensor]) -> torch.Tensor:
    """y plus each row's adapter update (lora.LoraBatch.add); x (rows, in), y (rows, out).

    With `lanes` (rows,) int32 (each row's lane, -1 for none): the compiled op
    torch.ops.amber.lora_rows (paged_ops, csrc/lora_rows.cpp), `a` this layer's A of all lanes per
    part (parts, lanes, r, in) and bts B^T per part (layers, lanes * r, out of the part), in fp32 or
    bf16: each row reads its own lane only, and its result never depends on the other rows. y comes
    back in x's dtype (the activations').

    Without (the compiled op not loaded): `a` this layer's A of the batch's k lanes side by side,
    per part (parts, k * r, in); bts B^T per part (layers, k * r, out); mask (rows, k * r) keeps each
    row's own lane's share, or None when every row has the same one. One matmul for A (batched over
    parts: `a` is a strided view of the lanes, never copied), one per part for B, however many
    adapters the batch mixes: each row is multiplied by every lane's A and masked, cheap at LoRA
    ranks. B^T is kept per part, not block-diagonal, because its bytes are what a step pays for."""
    if lanes is not None:
        y = y.to(x.dtype).contiguous()
        torch.ops.amber.lora_rows(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), a, bts, layer, lanes)
        return y
    x = x.reshape(-1, x.shape[-1]).to(a.dtype)
    if a.shape[0] == 1:
        h = (x @ a[0].t()).unsqueeze(0)           # (1, rows, k * r): a plain matmul, not a batch of one
    else:
        h = torch.matmul(x, a.transpose(1, 2))    # (parts, rows, k * r)
    y = y.to(a.dtype)  # quantized layers answer in bf16; the update is added in the adapters' dtype
    y2 = y.view(-1, y.shape[-1])
    if mask is not None:
        h.mul_(mask)
    column = 0
    for part in range(len(bts)):
        bt = bts[part][layer]
        out = bt.shape[-1]
        y2[:, column:column + out].addmm_(h[part], bt)
        column += out
    return y
