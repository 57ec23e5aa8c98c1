"""Amber's compiled CPU ops, one library: decode attention over the paged KV pool, the per-row LoRA
update, the int4 and int8 matmuls of quantized layers and RMSNorm (csrc/: paged_attention.cpp,
lora_rows.cpp, int4_mm.cpp, int8_mm.cpp, rms_norm.cpp, dense.h); how they are built and loaded, the packings the
matmuls read, and the pure-torch paths that stand in for them when they are not there (where the
library is missing, quantize.py packs for torch's kernels instead, so no layer runs a reference).

The op is optional. It is built for the CPU at hand (-march=native), so a library built on one
machine may fault on another: each build is named after the CPU (model and flags), the torch
version and the source, and `load` only ever picks the one made for this machine. Where no
compiler was found, or the build failed, `available()` is False and the decode step calls
`paged_decode_attention_reference`, which gives the same results (both compute in fp32).

Layout and argument order (both paths):
    q             (batch, heads, head_dim), fp32 or bf16; the output has its dtype
    key_pool      (num_slots, kv_heads, head_dim), contiguous, fp32 or bf16; slot = block * block_size + t
    value_pool    like key_pool, same dtype
    block_tables  (batch, max_blocks) int32; lengths (batch,) int32
    block_size, scale (softmax scale), window (0: none; else only the last `window` positions)

    paged_rope_attention(qkv, cos, sin, key_pool, value_pool, write_rows, block_tables, lengths,
    block_size, heads, scale, window) -> (batch, heads * head_dim) in the pools' dtype: a whole decode
    step's attention (RoPE, the KV write at write_rows, attention) from the qkv projection, fp32
    (paged_rope_attention_reference says what it computes).

    lora_rows(y, x, a, bts, layer, lanes), in place on y, returns nothing:
    y (rows, out) and x (rows, in), one dtype (fp32 or bf16), y contiguous; a (parts, lanes, r, in)
    and bts per part (layers, lanes * r, out of the part), contiguous, fp32 or bf16, or int8 rows
    each followed by its fp32 scale (to_lanes: a (..., in + 4), bts (..., out + 4)); lanes
    (rows,) int32, -1 for a row without adapter (left untouched). Row i adds, per part p, its lane's
    (A_p x_i) B^T_p in fp32 (lora_rows_reference; csrc/lora_rows.cpp says more).

    int4_mm(x, packed, sz, group, wide=False) -> (rows, out) bf16 (wide: those values in fp32);
    int4_mm_dense(..., fp32) the same product by a GEMM on the weights widened for the call:
    int4_pack's layout (csrc/int4_mm.cpp).
    int8_mm(x, q, scales, block) -> (rows, out) fp32; int8_mm_dense(..., fp32): int8_pack's layout,
    Q8_0's grid (csrc/int8_mm.cpp).

    rms_norm(x, weight, eps) -> y; add_rms_norm(x, delta, weight, eps) -> (x + delta, its norm):
    fp32 rows (csrc/rms_norm.cpp).

This module knows nothing of where the pool lives or who fills it (kv_cache.py), nor where the
library directory is kept beyond a default for its command line.

    python -m amber.engine.paged_ops build [DIR]
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from amber.engine.cpu import machine

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("paged_attention.cpp", "lora_rows.cpp",
                                                                  "int4_mm.cpp", "int8_mm.cpp", "rms_norm.cpp")]
# AMBER_KERNEL_MARCH (default native) picks the target, e.g. x86-64-v3 to build and test the
# portable (non-AVX-512) path on an AVX-512 machine; it is part of FLAGS, so of the library's name.
MARCH = os.environ.get("AMBER_KERNEL_MARCH") or "native"
# -ffp-contract=off: a product and a sum written apart stay two roundings (the kernels fuse where
# they say so, with fma intrinsics), so the sources' arithmetic is what runs
FLAGS = ["-O3", f"-march={MARCH}", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
HEADERS = [Path(__file__).parent / "csrc" / "dense.h"]


def library_path(directory: Path) -> Path:
    """Where the library for this CPU, this torch and this source is (or would be) built."""
    info = machine()
    key = hashlib.sha256("\n".join([info["cpu"], info["flags"], torch.__version__, " ".join(FLAGS)]).encode()
                         + b"".join(source.read_bytes() for source in SOURCES + HEADERS)).hexdigest()[:16]
    return Path(directory) / f"paged_attention-{key}.so"


def compile_command(sources: list[Path], output: Path) -> list[str]:
    torch_lib = Path(torch.__file__).parent / "lib"
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return ["g++", *FLAGS, abi, *includes, *map(str, sources), "-o", str(output),
            f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch"]


def build(dest: Path) -> Path:
    """Compile the op into `dest` unless this CPU's library is already there; returns its path.
    Raises FileNotFoundError without g++ and CalledProcessError when the compile fails."""
    target = library_path(dest)
    if target.exists():
        return target
    if shutil.which("g++") is None:
        raise FileNotFoundError("g++ not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    # built under a temporary name and renamed, so a concurrent build or load never sees half a file
    fd, partial = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.partial", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(compile_command(SOURCES, Path(partial)), check=True, capture_output=True, text=True)
        os.chmod(partial, 0o755)  # mkstemp made it private
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


_state = {"compiled": False, "tried": False, "fallback": None}


def _registered() -> bool:
    try:
        torch.ops.amber.paged_decode_attention
        torch.ops.amber.paged_rope_attention
        torch.ops.amber.lora_rows
        torch.ops.amber.int4_mm
        torch.ops.amber.int8_mm
        torch.ops.amber.int4_mm_dense
        torch.ops.amber.int8_mm_dense
        torch.ops.amber.rms_norm
        torch.ops.amber.add_rms_norm
    except (AttributeError, RuntimeError):
        return False
    return True


def available() -> bool:
    """Whether the compiled op is loaded in this process (the fallback op does not count)."""
    return _state["compiled"]


def load(directory: Path) -> bool:
    """Load this CPU's library from `directory` if it was built there (once per process: the op
    can be registered only once). Returns whether the compiled op is available; never raises."""
    if _state["compiled"] or _registered():
        return _state["compiled"]
    try:
        path = library_path(directory)
        if not path.exists():
            log.info("no paged attention kernel for this CPU at %s; using the torch fallback", path)
            return False
        torch.ops.load_library(str(path))
    except Exception as e:  # a broken or foreign library must not stop the server: fall back
        log.warning("paged attention kernel not loaded (%s); using the torch fallback", e)
        return False
    _state["compiled"] = _registered()
    return _state["compiled"]


def ensure() -> bool:
    """Once per process: load the library from `default_dir()` if built there, else register
    the reference as the op, so that TorchScript, which resolves torch.ops when it compiles a
    decode step, always finds torch.ops.amber.paged_decode_attention. Returns `available()`."""
    if not _state["tried"]:
        _state["tried"] = True
        if not load(default_dir()) and not _registered():
            library = torch.library.Library("amber", "DEF")
            library.define("paged_decode_attention(Tensor q, Tensor key_pool, Tensor value_pool, "
                           "Tensor block_tables, Tensor lengths, int block_size, float scale, int window) -> Tensor")
            library.impl("paged_decode_attention", paged_decode_attention_reference, "CompositeExplicitAutograd")
            library.define(ROPE_ATTENTION_SCHEMA)
            library.impl("paged_rope_attention", paged_rope_attention_reference, "CompositeExplicitAutograd")
            library.define("lora_rows(Tensor(a!) y, Tensor x, Tensor a, Tensor[] bts, int layer, Tensor lanes) -> ()")
            library.impl("lora_rows", lora_rows_reference, "CompositeExplicitAutograd")
            library.define("int4_mm(Tensor x, Tensor packed, Tensor sz, int group, bool wide=False) -> Tensor")
            library.impl("int4_mm", int4_mm_reference, "CompositeExplicitAutograd")
            library.define("int8_mm(Tensor x, Tensor q, Tensor scales, int block) -> Tensor")
            library.impl("int8_mm", int8_mm_reference, "CompositeExplicitAutograd")
            library.define("int4_mm_dense(Tensor x, Tensor packed, Tensor sz, int group, bool fp32) -> Tensor")
            library.impl("int4_mm_dense", int4_mm_dense_reference, "CompositeExplicitAutograd")
            library.define("int8_mm_dense(Tensor x, Tensor q, Tensor scales, int block, bool fp32) -> Tensor")
            library.impl("int8_mm_dense", int8_mm_dense_reference, "CompositeExplicitAutograd")
            library.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
            library.impl("rms_norm", rms_norm_reference, "CompositeExplicitAutograd")
            library.define("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)")
            library.impl("add_rms_norm", add_rms_norm_reference, "CompositeExplicitAutograd")
            _state["fallback"] = library  # kept alive: the registration lasts as long as the object
    return available()


def paged_decode_attention_reference(q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor,
                                     block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int,
                                     scale: float, window: int) -> torch.Tensor:
    """The op in plain torch: gather each row's positions into a padded (batch, kv_heads, longest,
    head_dim) copy, upcast to fp32, and run SDPA with a mask. The fallback, and the tests' oracle."""
    batch, heads, head_dim = q.shape
    longest = int(lengths.max()) if batch else 0
    positions = torch.arange(longest, device=q.device)  # (longest,)
    lengths = lengths.long()[:, None]  # (batch, 1)
    visible = positions < lengths
    if window > 0:
        visible &= positions >= lengths - window
    blocks = block_tables.long().gather(1, (positions // block_size).expand(batch, -1))
    # positions past a row's length may meet unused table entries (any value): read slot 0 there
    slots = torch.where(visible, blocks * block_size + positions % block_size, 0)  # (batch, longest)
    keys = key_pool[slots].float().transpose(1, 2)  # (batch, kv_heads, longest, head_dim)
    values = value_pool[slots].float().transpose(1, 2)
    out = F.scaled_dot_product_attention(q.float()[:, :, None], keys, values, attn_mask=visible[:, None, None],
                                         scale=scale, enable_gqa=heads != key_pool.shape[1])
    # a row with nothing visible comes out NaN from SDPA; the op gives zeros
    out = torch.where(visible.any(1)[:, None, None], out[:, :, 0], 0.0)  # (batch, heads, head_dim)
    return out.to(q.dtype)


def paged_decode_attention(q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor,
                           block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int,
                           scale: float, window: int) -> torch.Tensor:
    """The compiled op when loaded, else the reference."""
    if available():
        return torch.ops.amber.paged_decode_attention(q, key_pool, value_pool, block_tables, lengths,
                                                      block_size, scale, window)
    return paged_decode_attention_reference(q, key_pool, value_pool, block_tables, lengths, block_size,
                                            scale, window)


ROPE_ATTENTION_SCHEMA = ("paged_rope_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) key_pool, "
                         "Tensor(b!) value_pool, Tensor write_rows, Tensor block_tables, Tensor lengths, "
                         "int block_size, int heads, float scale, int window) -> Tensor")


def paged_rope_attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_pool: torch.Tensor,
                                   value_pool: torch.Tensor, write_rows: torch.Tensor, block_tables: torch.Tensor,
                                   lengths: torch.Tensor, block_size: int, heads: int, scale: float,
                                   window: int) -> torch.Tensor:
    """The fused decode-attention op in torch ops, the ones a decode step ran before it (and still
    runs without the library): rotate-half RoPE on q and k (layers.apply_rope's arithmetic: x * cos,
    then addcmul with the rotated x and sign-folded sin), q, k and v rounded to the pools' dtype, k
    and v written at `write_rows`, then paged_decode_attention. qkv (batch, (heads + 2 kv_heads) *
    head_dim) fp32; cos, sin (batch, head_dim) fp32 (any shape of that many values); write_rows
    (batch,) int64. Returns (batch, heads * head_dim) in the pools' dtype."""
    batch, kv_heads, head_dim = lengths.shape[0], key_pool.shape[1], key_pool.shape[2]
    half = head_dim // 2
    qkv = qkv.reshape(batch, heads + 2 * kv_heads, head_dim)
    cos, sin = cos.reshape(batch, 1, head_dim), sin.reshape(batch, 1, head_dim)
    qk = qkv[:, :heads + kv_heads]
    qk = torch.addcmul(qk * cos, torch.cat([qk[..., half:], qk[..., :half]], dim=-1), sin).to(key_pool.dtype)
    key_pool.index_copy_(0, write_rows, qk[:, heads:])
    value_pool.index_copy_(0, write_rows, qkv[:, heads + kv_heads:].to(value_pool.dtype))
    out = paged_decode_attention(qk[:, :heads], key_pool, value_pool, block_tables, lengths, block_size, scale, window)
    return out.reshape(batch, heads * head_dim)


def to_lanes(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 rows (r, n) as a lane stores them: in `dtype`, or for int8 each row's n values q =
    round(row / s), s = max |row| / 127, followed by the 4 bytes of s as fp32 -> (r, n + 4) int8
    (csrc/lora_rows.cpp's layout; from_lanes reads it back). A zero row has s = 0."""
    if dtype != torch.int8:
        return rows.to(dtype)
    scale = rows.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(scale > 0, rows / torch.where(scale > 0, scale, 1), 0).round().clamp(-127, 127)
    return torch.cat([q.to(torch.int8), scale.view(torch.int8)], dim=-1)


def from_lanes(lanes: torch.Tensor) -> torch.Tensor:
    """to_lanes' rows (any leading dims) as fp32: int8 rows are s q, computed in fp32."""
    if lanes.dtype != torch.int8:
        return lanes.float()
    return lanes[..., :-4].float() * lanes[..., -4:].contiguous().view(torch.float32)


def lora_rows_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bts: list[torch.Tensor], layer: int,
                        lanes: torch.Tensor) -> None:
    """The LoRA op in plain torch, in place on y: each row with a lane gathers its lane's A and B^T
    and adds (A x) B^T computed in fp32. The fallback, and the tests' oracle."""
    rows = torch.nonzero(lanes >= 0).flatten()
    if rows.numel() == 0:
        return
    lane = lanes.long()[rows]
    xs = x[rows].float()  # (n, in)
    r, updates = a.shape[2], []
    for part, bt in enumerate(bts):
        h = torch.bmm(from_lanes(a[part][lane]), xs[:, :, None])[:, :, 0]             # (n, r)
        b = from_lanes(bt[layer].view(a.shape[1], r, -1)[lane])                      # (n, r, out)
        updates.append(torch.bmm(h[:, None], b)[:, 0])
    y[rows] = (y[rows].float() + torch.cat(updates, dim=-1)).to(y.dtype)


def int4_pack(q: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_mm's layout of 4-bit weights: q (out, in) uint8 in [0, 15] and scales_zeros (groups,
    out, 2) bf16 (quantize.Int4Linear's) -> packed (out / 16, in / 2, 16) uint8, byte j of pair p
    of tile t holding q[16t + j][2p] in its low and q[16t + j][2p + 1] in its high nibble, and sz
    (out / 16, groups, 2, 16) bf16: a tile's 16 scales, then its 16 zeros, group after group."""
    out, width = q.shape
    pairs = q.view(out // 16, 16, width // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).permute(0, 2, 1).contiguous()
    sz = scales_zeros.permute(1, 0, 2).reshape(out // 16, 16, -1, 2).permute(0, 2, 3, 1).contiguous()
    return packed, sz


def int4_unpack(packed: torch.Tensor, sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4_pack's inverse: q (out, in) uint8, scale and zero (out, groups) fp32."""
    tiles, pairs, _ = packed.shape
    q = torch.stack([packed & 15, packed >> 4], dim=-1)                  # (tiles, pairs, 16, 2)
    q = q.permute(0, 2, 1, 3).reshape(tiles * 16, pairs * 2)
    scale, zero = sz.float().permute(0, 3, 1, 2).reshape(tiles * 16, -1, 2).unbind(-1)
    return q, scale, zero


def int4_weights(packed: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """int4_pack's weights as (out, in) fp32: q scale + (zero - 8 scale), a product then a sum."""
    q, scale, zero = int4_unpack(packed, sz)
    out = q.shape[0]
    return (q.view(out, -1, group).float() * scale[..., None] + (zero - 8 * scale)[..., None]).view(out, -1)


def int4_mm_reference(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int,
                      wide: bool = False) -> torch.Tensor:
    """The int4 op in plain torch: the weights q scale + (zero - 8 scale) in fp32, x rounded to
    bf16 and widened to fp32, one matmul, the product rounded to bf16 (with `wide`, widened back to
    fp32). The fallback (for TorchScript to resolve the op by; no layer packs for it without the
    library), and the tests' oracle."""
    y = (x.to(torch.bfloat16).float() @ int4_weights(packed, sz, group).T).to(torch.bfloat16)
    return y.float() if wide else y


def int8_pack(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_mm's layout of int8 weights with a scale per block of columns: q (out, in) int8 and
    scales (out, in / block) fp32 -> q (out / 16, in, 16), byte j of column k of tile t holding
    q[16t + j][k], and scales (out / 16, in / block, 16)."""
    out = q.shape[0]
    return (q.view(out // 16, 16, -1).transpose(1, 2).contiguous(),
            scales.view(out // 16, 16, -1).transpose(1, 2).contiguous())


def int8_rows(q: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `rows` (any shape of ids) of int8_pack's q and scales, as (*rows.shape, in) int8 and
    (*rows.shape, in / block) fp32: an embedding lookup in the head's layout."""
    tile, lane = torch.div(rows, 16, rounding_mode="floor"), rows % 16
    return q[tile, :, lane], scales[tile, :, lane]


def int8_weights(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """int8_pack's weights as (out, in) fp32: q scale."""
    out, width = q.shape[0] * 16, q.shape[1]
    w = q.transpose(1, 2).reshape(out, -1, block).float() * scales.transpose(1, 2).reshape(out, -1, 1)
    return w.view(out, width)


def int8_mm_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """The int8 op in plain torch: the weights q scale in fp32, x rounded to bf16 and widened to
    fp32, one matmul. The fallback (for TorchScript to resolve the op by), and the tests' oracle."""
    return x.to(torch.bfloat16).float() @ int8_weights(q, scales, block).T


def _dense_reference(x: torch.Tensor, w: torch.Tensor, fp32: bool) -> torch.Tensor:
    """A GEMM on widened weights w (out, in) fp32, as csrc/dense.h runs it."""
    dtype = torch.float32 if fp32 else torch.bfloat16
    y = F.linear(x.to(dtype), w.to(dtype))
    return y.to(torch.bfloat16) if fp32 and x.dtype == torch.bfloat16 else y


def int4_mm_dense_reference(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int,
                            fp32: bool) -> torch.Tensor:
    """int4_mm_dense in plain torch: the weights q scale + (zero - 8 scale) widened, one GEMM."""
    return _dense_reference(x, int4_weights(packed, sz, group), fp32)


def int8_mm_dense_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block: int,
                            fp32: bool) -> torch.Tensor:
    """int8_mm_dense in plain torch: the weights q scale widened, one GEMM."""
    return _dense_reference(x, int8_weights(q, scales, block), fp32)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm op in plain torch, Hugging Face's LlamaRMSNorm in fp32 (the op sums the squares in
    its own order, so the two agree to fp32 rounding). For TorchScript to resolve the op by, and
    the tests' oracle."""
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + delta
    return total, rms_norm_reference(total, weight, eps)


def default_dir() -> Path:
    return Path(os.environ.get("AMBER_KERNEL_DIR") or Path.home() / ".cache" / "amber" / "kernels")


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] != "build":
        print("usage: python -m amber.engine.paged_ops build [DIR]", file=sys.stderr)
        return 2
    dest = Path(argv[1]) if len(argv) == 2 else default_dir()
    try:
        print(f"Amber's CPU ops (attention, LoRA, int4/int8 matmuls, RMSNorm): {build(dest)}")
    except FileNotFoundError:
        print("paged attention kernel not built: no g++ (optional; the torch fallback is used)")
    except subprocess.CalledProcessError as e:
        print(f"paged attention kernel failed to build (optional; the torch fallback is used):\n{e.stderr}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
