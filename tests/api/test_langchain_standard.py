"""LangChain's standard chat-model integration tests (langchain-tests, from its own venv) for its
unchanged ChatOpenAI pointed at the live server: that venv's pytest runs
tests/clients/langchain_standard/, whose pytest.ini gives every async test a fresh event loop.
Tests for capabilities Amber lacks (tools, structured output, JSON mode, images, audio, PDF) skip;
none may fail."""
from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.api.sdk import REPO, VENVS

pytestmark = pytest.mark.slow

SUITE = REPO / "tests/clients/langchain_standard"
# The plain text chat surface: each of these must run and pass, not skip.
MUST_PASS = {"test_invoke", "test_ainvoke", "test_stream[model0]", "test_astream[model1]", "test_stream_events_v3",
             "test_astream_events_v3", "test_batch", "test_abatch", "test_conversation",
             "test_double_messages_conversation", "test_usage_metadata", "test_usage_metadata_streaming",
             "test_stop_sequence", "test_message_with_name", "test_ainvoke_with_model_override",
             "test_astream_with_model_override"}


def langchain_tests_python() -> Path:
    variable = os.environ.get("AMBER_CLIENT_LANGCHAIN_TESTS")
    if variable:
        return Path(variable).absolute()  # not resolve(): that would leave the venv for its base python
    python = VENVS / "langchain-tests-1.1.9/bin/python"
    if not python.exists():
        pytest.skip("AMBER_CLIENT_LANGCHAIN_TESTS is unset and .venv-clients/langchain-tests-1.1.9 is not "
                    "built: run `make clients` (make test does)")
    return python


def outcomes(junit: Path) -> dict[str, str]:
    """test name -> passed | skipped | failed | error, from pytest's JUnit XML."""
    result = {}
    for case in ET.parse(junit).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
        result[case.get("name")] = {"skipped": "skipped", "failure": "failed", "error": "error"}.get(
            kinds[0] if kinds else "", "passed")
    return result


def test_langchain_standard_chat_tests(server, tmp_path):
    python = langchain_tests_python()
    assert python.exists(), f"{python} is missing: run `make clients` (make test does)"
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "AMBER_URL": server.url, "AMBER_KEY": server.key}
    # pytest-benchmark (a langchain-tests dependency) makes its storage folder even when no test uses it
    command = [python, "-m", "pytest", SUITE, "-c", SUITE / "pytest.ini", "-p", "no:cacheprovider", "-q",
               f"--junitxml={junit}", f"--benchmark-storage={tmp_path / 'benchmarks'}"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-20000:] + out.stderr[-5000:]
    results = outcomes(junit)
    print(out.stdout.strip().splitlines()[-1], "; skipped:", sorted(n for n, k in results.items() if k == "skipped"))
    bad = {name: kind for name, kind in results.items() if kind in ("failed", "error")}
    assert not bad, bad
    assert {name for name in MUST_PASS if results.get(name) != "passed"} == set(), results
