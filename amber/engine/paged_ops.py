"""Placeholder until the compiled kernel lands: no kernel, attention gathers."""
import torch
import torch.nn.functional as F

_defined = False


def available() -> bool:
    return False


def define_op() -> None:
    """Make torch.ops.amber.paged_decode_attention exist (TorchScript resolves it when it compiles
    a decode step), by the reference implementation when the compiled library is not loaded."""
    global _defined
    if _defined or hasattr(torch.ops.amber, "paged_decode_attention"):
        _defined = True
        return
    lib = torch.library.Library("amber", "DEF")
    lib.define("paged_decode_attention(Tensor q, Tensor key_pool, Tensor value_pool, Tensor block_tables, "
               "Tensor lengths, int block_size, float scale, int window) -> Tensor")
    lib.impl("paged_decode_attention", reference, "CompositeExplicitAutograd")
    define_op.lib = lib
    _defined = True


def reference(q, key_pool, value_pool, block_tables, lengths, block_size: int, scale: float, window: int):
    batch, heads, head_dim = q.shape
    context = int(lengths.max())
    positions = torch.arange(context, device=q.device)
    rows = block_tables.long()[:, positions // block_size] * block_size + positions % block_size
    keys = key_pool.index_select(0, rows.flatten()).view(batch, context, *key_pool.shape[1:]).transpose(1, 2)
    values = value_pool.index_select(0, rows.flatten()).view(batch, context, *value_pool.shape[1:]).transpose(1, 2)
    last = (lengths.long() - 1).unsqueeze(1)
    visible = positions <= last
    if window:
        visible &= positions > last - window
    out = F.scaled_dot_product_attention(q.unsqueeze(2).to(keys.dtype), keys, values,
                                         attn_mask=visible[:, None, None, :], scale=scale,
                                         enable_gqa=heads != keys.shape[1])
    return out[:, :, 0].to(q.dtype)
