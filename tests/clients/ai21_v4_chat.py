"""Run by the ai21 4.x client venv (not Amber's): Jamba-style `chat.completions` with the official
SDK, unchanged, streamed and not; prints what it got as JSON. argv: base URL, API key."""
import json
import sys

from ai21 import AI21Client, errors
from ai21.models.chat import ChatMessage, SystemMessage, UserMessage

url, key = sys.argv[1], sys.argv[2]
client = AI21Client(api_key=key, api_host=f"{url}/studio/v1")
messages = [SystemMessage(content="You are a concise assistant."),
            UserMessage(content="What is the capital of France?")]
report = {"chat": client.chat.completions.create(model="j2-light", messages=messages, max_tokens=24,
                                                 temperature=0, stop=["\n\n"]).model_dump()}
report["chat_n"] = client.chat.completions.create(model="j2-light", messages=messages, max_tokens=8, n=2,
                                                  temperature=1.0, top_p=0.9).model_dump()
stream = client.chat.completions.create(model="j2-light", messages=[ChatMessage(role="user", content="Hi!")]
                                        + messages[1:], max_tokens=24, temperature=0, stream=True)
report["stream_plain"] = [chunk.model_dump() for chunk in stream]
stream = client.chat.completions.create(model="j2-light", messages=messages, max_tokens=24, temperature=0, stream=True)
report["stream"] = [chunk.model_dump() for chunk in stream]
report["errors"] = {}
for name, call in {
    "unknown_model": lambda: client.chat.completions.create(model="jamba-large", messages=messages),
    "bad_value": lambda: client.chat.completions.create(model="j2-light", messages=messages, n=2, stream=True),
}.items():
    try:
        result = call()
        list(result) if name == "bad_value" else None
        report["errors"][name] = None
    except errors.AI21APIError as exc:
        report["errors"][name] = [type(exc).__name__, exc.status_code]
print(json.dumps(report))
