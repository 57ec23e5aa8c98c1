"""LangChain's standard chat-model integration tests (langchain-tests' ChatModelIntegrationTests)
for its unchanged ChatOpenAI pointed at Amber's /v1. Run by the langchain-tests client venv's
pytest, not Amber's; tests/api/test_langchain_standard.py starts it against a live server, passing
AMBER_URL and AMBER_KEY.

Async tests run with pytest-asyncio's default function-scoped event loop (pytest.ini here): a
fresh loop per test, and `fresh_loop` checks that no two tests share one. Each test's ChatOpenAI
gets its own async HTTP client: by default langchain-openai 1.7.3 shares one process-wide
(`@lru_cache` on `_cached_async_httpx_client`), and the next loop's request on a connection pooled
by a closed loop dies with "RuntimeError: Event loop is closed" in the client before reaching any
server (langchain-ai/langchain#35783, open). The sync tests keep ChatOpenAI's default clients.

The capability flags say what Amber does: plain text chat with streaming and usage. No tool
calling, structured output, JSON mode or image/audio/PDF inputs, so those tests skip."""
import asyncio
import os

import openai
import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

_loops: list[asyncio.AbstractEventLoop] = []  # held so a finished loop's id is never reused


@pytest.fixture(autouse=True)
async def fresh_loop():
    loop = asyncio.get_running_loop()
    assert all(loop is not seen for seen in _loops), "an async test reused an earlier test's event loop"
    _loops.append(loop)


class TestAmberChatOpenAI(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict:
        # Short answers keep the run quick on CPU; no retries, so an error from Amber is seen as one.
        # Read once per test (the `model` fixture), so the async client is new with each test's loop.
        return {"model": "j2-light", "base_url": os.environ["AMBER_URL"] + "/v1", "api_key": os.environ["AMBER_KEY"],
                "temperature": 0, "max_tokens": 32, "max_retries": 0, "timeout": 120, "stream_usage": True,
                "http_async_client": openai.DefaultAsyncHttpxClient()}

    @property
    def has_tool_calling(self) -> bool:
        return False  # ChatOpenAI has bind_tools; Amber refuses `tools`

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True  # usage on every response, and on the last chunk with stream_options.include_usage

    @property
    def supports_model_override(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return "smollm2-135m-instruct"  # j2-light's own name in the registry (tiny has no chat template)
