"""Print the path of the default model's GGUF (inside its installed package), which llama.cpp reads."""
import tomllib

from amber.config import DEFAULT_MODEL, DEFAULT_REGISTRY, ModelSpec
from amber.engine.checkpoint import gguf_source

table = tomllib.loads(DEFAULT_REGISTRY)["models"][DEFAULT_MODEL]
print(gguf_source(ModelSpec(name=DEFAULT_MODEL, **{**table, "aliases": tuple(table["aliases"])})))
