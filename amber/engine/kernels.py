"""Which kernel multiplies a quantized layer by how many rows, measured on the CPU at hand.

A quantized layer (quantize.py) can multiply its input three ways: torch's fused low-bit kernel
on the packed weights (int4 or int8), a GEMM on a bf16 copy of the dequantized weights, or a GEMM
on an fp32 copy. Which is fastest depends on the CPU far more than on the code: with AVX-512 BF16
or AMX a bf16 GEMM is the fastest way through a batch, without them it is ~3x slower than fp32,
and where the fused kernel stops winning moves with the memory system. So nothing is assumed:
for each distinct layer shape of a model, every path is timed at every row count of ROWS, passing
once through all of the model's layers of that shape (a decode step reads each layer's weights
once, from memory rather than a hot cache, and so do these timings), and each layer is given

    fused kernel up to `fused_max_rows` rows, then the one dense copy (bf16, fp32 or none)

that costs least over ROWS (the mean of log(time / fastest time at that row count): decode's row
counts and prefill's weigh alike per grid point). A copy that no chosen path uses is never kept:
a layer whose fused kernel wins everywhere holds no dense copy at all, and a cheaper-in-memory
choice wins ties (within TIE, 2%): none before bf16 before fp32.

A layer on Amber's own kernels (`makes_dense`: int4 where paged_ops' library is built) keeps no
copy at all: its dense paths widen the packed weights for each product (csrc/dense.h), in bf16 or
fp32, timed as such, and only where the switch to them lies is chosen. A big batch pays the
widening (~15 ms a forward of SmolLM2-135M: a 512-row prefill chunk ~1.2x, a 64-row one ~1.6x the
kept copy's time) and the server holds 212 MB less (SmolLM2-135M's bf16 copies of its int4 layers).

The timings are kept per machine under the cache directory (AMBER_HOME/kernels), keyed by the CPU
model and flags, the torch version and the thread count, so a server measures once per machine
(~8 s for SmolLM2-135M on 2 cores) and a different CPU measures again. Without a cache
directory the choice is kept for the process only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from amber.engine import paged_ops
from amber.engine.cpu import machine  # noqa: F401  (kernels.machine: what the timings depend on)
from amber.engine.quantize import DENSE_DTYPES, Int4Linear, Int8BlockLinear, QuantizedLinear

log = logging.getLogger(__name__)

# Row counts timed: decode batches (1..max_batch rows, numResults samples count one each) and
# prefill chunks. A count between two grid points takes the lower point's choice.
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 256)
# The LM head is one huge matrix (vocab x hidden) that sees many rows only when a prompt is
# scored (echo, logprobs): timed up to 64 rows, where its choice is already settled.
HEAD_ROWS = tuple(r for r in ROWS if r <= 64)
DENSE = tuple(DENSE_DTYPES)
TIE = 0.02      # mean log-time within 2% counts as a tie, won by the choice holding fewer bytes
PASSES = 3      # timed passes per path and row count, the fastest kept
BUDGET_S = 0.25  # ... or fewer when a pass over the layers of a shape takes longer than this,
MIN_PASSES = 2  # but never one: a single pass at a big row count decides the prefill path on one
                # sample (a bench run on a noisy machine kept int4 layers on their fused kernel for
                # prefill that way, 8-23% slower at 512 rows than the bf16 weights made per product)
CACHE_VERSION = 3  # 2: Amber's int4 kernel, and dense weights made per product; 3: MIN_PASSES
UNLIMITED = 1 << 30

_memory: dict[str, dict] = {}  # cache key -> the cache file's content, for the process


@dataclass(frozen=True)
class Choice:
    """How a layer multiplies: its fused kernel up to `fused_max_rows` rows, `dense` above
    ("bf16", "fp32", or None when the fused kernel takes every row count), from a kept copy or,
    `made`, from weights widened for each product (no copy held)."""
    fused_max_rows: int
    dense: str | None
    made: bool = False

    def describe(self) -> str:
        if self.dense is None:
            return "fused"
        dense = f"{self.dense} made per product" if self.made else self.dense
        if self.fused_max_rows == 0:
            return dense
        return f"fused<={self.fused_max_rows},{dense}"


def cache_key(info: dict) -> str:
    """The machine's, and the compiled ops' (their sources, build flags, CPU and torch: timings
    taken with an older kernel say nothing of a newer one)."""
    fields = {k: info.get(k) for k in ("cpu", "flags", "torch", "threads", "isa_limits")}
    fields["ops"] = paged_ops.library_path(Path(".")).stem
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(f"{CACHE_VERSION}:{text}".encode()).hexdigest()[:16]


def shape_key(layer: QuantizedLinear, activation: torch.dtype) -> str:
    """Layers with the same key run the same kernels on the same bytes."""
    if isinstance(layer, Int4Linear):
        kind = f"int4/g{layer.group}" + ("/amber" if layer.kernel == "amber" else "")  # whose kernel
    elif isinstance(layer, Int8BlockLinear):
        kind = f"int8/b{layer.block}/amber"
    else:
        kind = f"int8/x{layer.weight.shape[0]}"  # scale groups: kernel calls per product
    return f"{kind} {layer.out_features}x{layer.in_features} in:{str(activation).removeprefix('torch.')}"


def quantized_layers(model: nn.Module) -> dict[str, list[QuantizedLinear]]:
    """The model's tunable layers (quantized, with a CPU kernel), grouped by shape key."""
    activation = model.activation_dtype
    groups: dict[str, list[QuantizedLinear]] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.has_fused_kernel():
            groups.setdefault(shape_key(module, activation), []).append(module)
    return groups


def tune(model: nn.Module, cache_dir: Path | None = None, retune: bool = False) -> dict[str, Choice]:
    """Choose (measuring what is not yet known for this machine) and apply a kernel per layer
    shape; drops or converts each layer's dense copy to match. Returns shape key -> Choice."""
    groups = quantized_layers(model)
    if not groups:
        return {}
    info = machine()
    key = cache_key(info)
    path = cache_dir / f"{key}.json" if cache_dir else None
    known = {} if retune else _load(key, path)
    measured = False
    activation = model.activation_dtype  # the dtype the layers are fed
    for shape, layers in groups.items():
        if shape not in known.get("shapes", {}):
            rows = HEAD_ROWS if layers[0].out_features >= 16 * layers[0].in_features else ROWS
            began = time.perf_counter()
            times = measure(layers, activation, rows)
            choice = choose(rows, times, made=layers[0].makes_dense)
            known.setdefault("shapes", {})[shape] = {"rows": list(rows), "ms": times, "choice": asdict(choice),
                                                     "layers": len(layers),
                                                     "seconds": round(time.perf_counter() - began, 2)}
            measured = True
    known["machine"] = info
    _memory[key] = known
    if measured and path is not None:
        _save(path, known)
    choices = {shape: Choice(**known["shapes"][shape]["choice"]) for shape in groups}
    for shape, layers in groups.items():
        for layer in layers:
            layer.use(choices[shape])
    model.kernels = choices
    return choices


def summary(choices: dict[str, Choice]) -> str:
    """One line: each layer shape and its paths."""
    return "; ".join(f"{shape.split(' in:')[0]}: {c.describe()}" for shape, c in choices.items()) or "none"


def _load(key: str, path: Path | None) -> dict:
    if key in _memory:
        return json.loads(json.dumps(_memory[key]))
    if path is not None and path.exists():
        try:
            known = json.loads(path.read_text())
            if known.get("version") == CACHE_VERSION:
                return known
        except (OSError, ValueError):
            log.warning("kernel choices in %s are unreadable; measuring again", path)
    return {"version": CACHE_VERSION}


def _save(path: Path, known: dict) -> None:
    """Atomically, as several servers on one AMBER_HOME may start together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(known, indent=1))
    temporary.replace(path)


def cached(cache_dir: Path) -> dict | None:
    """This machine's cached choices (the cache file's content), or None if never measured."""
    info = machine()
    path = cache_dir / f"{cache_key(info)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def measure(layers: list[QuantizedLinear], activation: torch.dtype, rows: tuple[int, ...]) -> dict[str, list[float]]:
    """Milliseconds per layer for each path and row count, over one pass through `layers`. The
    input arrives in the activation dtype, so each path pays for its own cast."""
    paths = {"fused": lambda i, x: layers[i].fused(layers[i].kernel_input(x))}
    if layers[0].makes_dense:  # the dense weights made per product: nothing to copy
        paths |= {dtype: (lambda i, x, dtype=dtype: layers[i].dense_made(x, dtype)) for dtype in DENSE}
    else:
        dense_bf16 = [layer.dense_weights() for layer in layers]
        copies = {"bf16": dense_bf16, "fp32": [w.float() for w in dense_bf16]}
        paths |= {"bf16": lambda i, x: F.linear(x.to(torch.bfloat16), copies["bf16"][i]),
                  "fp32": lambda i, x: F.linear(x.float(), copies["fp32"][i])}
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, layers[0].in_features, generator=generator).to(activation)
            best = {name: math.inf for name in paths}
            for name, path in paths.items():  # warm-up: first calls allocate and pick kernels
                path(0, x)
            spent, passes = 0.0, 0
            while passes < PASSES and (passes < MIN_PASSES or spent < BUDGET_S):
                for name, path in paths.items():  # interleaved, so drift in the machine hits all alike
                    began = time.perf_counter()
                    for i in range(len(layers)):
                        path(i, x)
                    elapsed = time.perf_counter() - began
                    spent += elapsed
                    best[name] = min(best[name], elapsed)
                passes += 1
            for name in paths:
                times[name].append(round(best[name] / len(layers) * 1000, 4))
    return times


def choose(rows: tuple[int, ...], times: dict[str, list[float]], made: bool = False) -> Choice:
    """The cheapest Choice over `rows` (see the module docstring); `made`: the dense paths timed
    were weights made per product, so none of them holds memory."""
    fastest = [min(times[name][i] for name in times) for i in range(len(rows))]

    def cost(per_row: list[float]) -> float:
        return sum(math.log(t / f) for t, f in zip(per_row, fastest)) / len(rows)

    options: list[tuple[float, int, Choice]] = [(cost(times["fused"]), 0, Choice(UNLIMITED, None))]
    for order, dense in enumerate(DENSE, start=1):
        for cut in range(len(rows) + 1):  # fused for the first `cut` row counts, dense above
            per_row = times["fused"][:cut] + times[dense][cut:]
            limit = rows[cut - 1] if cut else 0
            if cut == len(rows):
                continue  # that is the fused-only option, which needs no copy
            options.append((cost(per_row), 0 if made else order, Choice(limit, dense, made)))
    best = min(c for c, _, _ in options)
    # the least memory among those within TIE of the best; then the lower cost
    return min((o for o in options if o[0] <= best + TIE), key=lambda o: (o[1], o[0]))[2]
