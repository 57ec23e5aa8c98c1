"""Run by the openai client venv (not Amber's): drives a live server with the official `openai`
SDK, unchanged, and prints what it got as JSON for the test to check. argv: base URL, API key."""
import json
import sys

import openai
from openai import OpenAI

url, key = sys.argv[1], sys.argv[2]
client = OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
report = {"models": [m.id for m in client.models.list()], "model": client.models.retrieve("j2-light").id}

prompt = "The capital of France is"
done = client.completions.create(model="j2-light", prompt=prompt, max_tokens=12, temperature=0, logprobs=3,
                                 echo=True, stop=["\n\n"], seed=1)
report["completion"] = done.model_dump()
streamed = client.completions.create(model="j2-light", prompt=prompt, max_tokens=12, temperature=0, stop=["\n\n"],
                                     stream=True, stream_options={"include_usage": True})
report["completion_stream"] = [chunk.model_dump() for chunk in streamed]
report["completion_batch"] = client.completions.create(
    model="j1-large", prompt=["Once upon a time", "1, 2, 3,"], max_tokens=4, n=2, temperature=0.8, seed=3,
    presence_penalty=0.5, frequency_penalty=0.5).model_dump()

messages = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
report["chat"] = client.chat.completions.create(model="j2-light", messages=messages, max_tokens=24, temperature=0,
                                                logprobs=True, top_logprobs=2).model_dump()
report["chat_seeded"] = [client.chat.completions.create(model="j2-light", messages=messages, max_tokens=16,
                                                        temperature=1.0, seed=42, n=2).model_dump()
                         for _ in range(2)]
stream = client.chat.completions.create(model="j2-light", messages=messages, max_tokens=24, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
report["chat_stream"] = [chunk.model_dump() for chunk in stream]

report["errors"] = {}
for name, call in {
    "bad_key": lambda: OpenAI(api_key="wrong", base_url=f"{url}/v1", max_retries=0).models.list(),
    "unknown_model": lambda: client.chat.completions.create(model="gpt-9", messages=messages),
    "suffix": lambda: client.completions.create(model="j2-light", prompt="x", suffix="y"),
    "bad_value": lambda: client.chat.completions.create(model="j2-light", messages=messages, temperature=7),
}.items():
    try:
        call()
        report["errors"][name] = None
    except openai.APIStatusError as exc:
        report["errors"][name] = [type(exc).__name__, exc.status_code, exc.body.get("param"), exc.body.get("code")]
print(json.dumps(report))
