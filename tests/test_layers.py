"""The import direction STYLE.md asks for, held by reading the source: the engine speaks token ids
and knows nothing of HTTP, the database or any provider's wire format; the OpenAI layer borrows
nothing from the AI21 one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

AMBER = Path(__file__).resolve().parent.parent / "amber"
ENGINE_MUST_NOT_IMPORT = ("amber.api", "amber.store", "amber.serving", "amber.worker", "fastapi",
                          "starlette", "pydantic", "sqlalchemy", "ai21_tokenizer")
AI21_SPELLINGS = ("<|newline|>", "token_string", "id_for_string", "ai21_string", "j2_tokenize", "ai21_tokenizer")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function; relative imports resolved."""
    package = ".".join(path.relative_to(AMBER.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from amber import api`
    return found


def sources(folder: str) -> list[Path]:
    return sorted((AMBER / folder).rglob("*.py"))


def test_the_walk_sees_imports():
    assert "torch" in imports(AMBER / "engine" / "engine.py")
    assert "amber.api.ai21.token_strings" in imports(AMBER / "api" / "ai21" / "convert.py")


@pytest.mark.parametrize("path", sources("engine"), ids=lambda p: str(p.relative_to(AMBER)))
def test_engine_imports_no_api_store_or_web(path):
    bad = {m for m in imports(path) if any(m == b or m.startswith(b + ".") for b in ENGINE_MUST_NOT_IMPORT)}
    assert not bad, f"{path.relative_to(AMBER)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sources("engine"), ids=lambda p: str(p.relative_to(AMBER)))
def test_engine_knows_no_ai21_token_strings(path):
    text = path.read_text()
    assert not [s for s in AI21_SPELLINGS if s in text], f"{path.relative_to(AMBER)} spells tokens AI21's way"


@pytest.mark.parametrize("path", sources("api/openai"), ids=lambda p: str(p.relative_to(AMBER)))
def test_openai_layer_borrows_nothing_from_ai21(path):
    bad = {m for m in imports(path) if m.startswith("amber.api.ai21")}
    assert not bad, f"{path.relative_to(AMBER)} imports {sorted(bad)}"


def test_the_scheduler_is_plain_python():
    assert not {m for m in imports(AMBER / "engine" / "scheduler.py") if m.split(".")[0] == "torch"}


@pytest.mark.parametrize("path", sources("files"), ids=lambda p: str(p.relative_to(AMBER)))
def test_shared_files_know_no_engine_database_or_api(path):
    """amber/files: keys and bytes; what a key means to the engine or the store is its callers' business."""
    bad = {m for m in imports(path) if m.startswith("amber.") and not m.startswith(("amber.files", "amber.config"))}
    assert not bad, f"{path.relative_to(AMBER)} imports {sorted(bad)}"
