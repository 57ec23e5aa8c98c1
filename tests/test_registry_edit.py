"""The registry file's text edits: comments and layout survive, and an add then a remove give
back the file byte for byte."""
from __future__ import annotations

import tomllib

import pytest

from amber.config import DEFAULT_REGISTRY, ModelSpec, Registry
from amber.registry_edit import Refused, append_table, check_new_names, remove_table

TINY = {"aliases": ("t", "t2"), "path": '/models/a "quoted" dir', "dtype": "float32", "max_context": 256}


def test_append_keeps_the_text_and_adds_one_table():
    new = append_table(DEFAULT_REGISTRY, "tiny", TINY, comment="added by a test")
    assert new.startswith(DEFAULT_REGISTRY) and "# added by a test\n[models.tiny]\n" in new
    assert tomllib.loads(new)["models"]["tiny"] == {**TINY, "aliases": ["t", "t2"]}


def test_a_name_that_is_no_bare_key_is_quoted():
    new = append_table(DEFAULT_REGISTRY, "llama-3.2-1b", {"gguf_path": "/m.gguf"})
    assert '[models."llama-3.2-1b"]' in new
    assert tomllib.loads(new)["models"]["llama-3.2-1b"] == {"gguf_path": "/m.gguf"}


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_add_then_remove_gives_the_file_back(order):
    text = DEFAULT_REGISTRY + "\n# a trailing note\n"
    both = append_table(append_table(text, "a", TINY, "first"), "b.c", {"gguf_path": "/m.gguf"})
    assert remove_table(remove_table(both, "a" if order[0] == "a" else "b.c"),
                        "b.c" if order[0] == "a" else "a") == text


def test_removing_a_middle_table_keeps_the_next_tables_comments():
    text = ('default = "a"\n\n[models.a]\npath = "/a"\n\n[models.gone]\npath = "/g"\n\n'
            '# about c\n[models.c]\npath = "/c"\n')
    assert remove_table(text, "gone") == 'default = "a"\n\n[models.a]\npath = "/a"\n\n# about c\n[models.c]\npath = "/c"\n'


def test_a_model_written_as_an_inline_table_is_not_removed_by_guesswork():
    text = 'default = "a"\n[models]\na = { path = "/a" }\nb = { path = "/b" }\n'
    with pytest.raises(Refused, match="edit the file by hand"):
        remove_table(text, "b")


def test_names_and_aliases_must_be_free_and_well_formed():
    registry = Registry("a", {"a": ModelSpec("a", aliases=("j2-light",), path="/a")})
    check_new_names(registry, "b", ("c",))
    for name, aliases, says in [("a", (), "already a model"), ("j2-light", (), "already an alias of 'a'"),
                                ("b", ("a",), "already a model"), ("b", ("c", "c"), "more than once"),
                                ("b", ("b",), "more than once"), ("b c", (), "not allowed"),
                                ("b", ("[x]",), "alias '[x]' is not allowed")]:
        with pytest.raises(Refused, match=says.replace("[", r"\[").replace("]", r"\]")):
            check_new_names(registry, name, aliases)
