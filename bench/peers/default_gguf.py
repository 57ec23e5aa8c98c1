"""Print the path of the default model's GGUF (inside its installed package), which llama.cpp reads."""
from amber.config import DEFAULT_MODEL, DEFAULT_REGISTRY, parse_registry
from amber.engine.checkpoint import gguf_source

print(gguf_source(parse_registry(DEFAULT_REGISTRY).models[DEFAULT_MODEL]))
