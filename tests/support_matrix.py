"""The README's support matrix, produced by the tests that prove each cell.

A test that shows a family can do something carries `@pytest.mark.supports(family, column, ...)`
(several columns at once, and `cell="..."` where the answer is not a plain yes, such as a prefix
cache that is off by design for a family, proven by a test that checks it is off). In a
parametrized test, "{name}" in a family or column stands for the parameter `name` of each case
(`supports("{tiny}", "{mode}")`). When a run has
a result for every family x column, the matrix is drawn from those results: a cell is its
marker's text if every test marked for it passed, "FAILED" if any failed. The run then fails if the
README's matrix differs (`AMBER_WRITE_MATRIX=1` rewrites it instead). Runs of a subset of the tests
(`-k`, one file) miss cells and leave the README alone.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FAMILIES = ("llama", "gemma3", "gptj", "jamba")
COLUMNS = ("complete", "prompt logprobs", "batching", "prefix cache", "custom models", "fast decode",
           "float32", "bfloat16", "int8", "int8-bf16", "int4")
START, END = "<!-- support-matrix -->", "<!-- /support-matrix -->"
_results: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (family, column) -> [(outcome, cell)]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "supports(family, *columns, cell='yes'): the test proves these "
                                       "cells of the README's support matrix (tests/support_matrix.py)")


def cells(item) -> list[tuple[str, list[str], str]]:
    """(family, columns, cell text) of each `supports` mark on a collected test, "{param}"s filled in."""
    params = {k: str(v) for k, v in getattr(getattr(item, "callspec", None), "params", {}).items()}
    out = []
    for mark in item.iter_markers("supports"):
        family, *columns = (arg.format(**params) for arg in mark.args)
        out.append((family, columns, mark.kwargs.get("cell", "yes")))
    return out


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        for family, columns, _ in cells(item):
            unknown = {family} - set(FAMILIES) | set(columns) - set(COLUMNS)
            if unknown or not columns:
                raise pytest.UsageError(f"{item.nodeid}: supports({family}, {columns}): unknown {sorted(unknown)} "
                                        f"(families {FAMILIES}, columns {COLUMNS})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped or (report.when != "call" and report.passed):
        return
    for family, columns, text in cells(item):
        for column in columns:
            _results.setdefault((family, column), []).append((report.outcome, text))


def render() -> str:
    def cell(key):
        outcomes = _results[key]
        if any(o != "passed" for o, _ in outcomes):
            return "FAILED"
        texts = sorted({text for _, text in outcomes})
        return "; ".join(texts)

    lines = ["| family | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {f} | " + " | ".join(cell((f, c)) for c in COLUMNS) + " |" for f in FAMILIES]
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus) -> None:
    if any((f, c) not in _results for f in FAMILIES for c in COLUMNS):
        return  # a partial run: not every cell was tested
    text = README.read_text()
    block = f"{START}\n{render()}\n{END}"
    current = re.search(re.escape(START) + ".*?" + re.escape(END), text, flags=re.S)
    if current and current.group(0) == block:
        return
    if os.environ.get("AMBER_WRITE_MATRIX") == "1":
        README.write_text(text.replace(current.group(0), block) if current else text + "\n" + block + "\n")
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("README.md's support matrix differs from what the tests found "
                            "(AMBER_WRITE_MATRIX=1 make test rewrites it):\n" + block, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
