"""Run by the langchain-openai client venv (not Amber's): LangChain's OpenAI chat model pointed at
Amber's base URL, unchanged; prints what it got as JSON. argv: base URL, API key."""
import json
import sys

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

url, key = sys.argv[1], sys.argv[2]
llm = ChatOpenAI(model="j2-light", base_url=f"{url}/v1", api_key=key, temperature=0, max_tokens=24, max_retries=0,
                 stream_usage=True)
messages = [SystemMessage("You are a concise assistant."), HumanMessage("What is the capital of France?")]
answer = llm.invoke(messages)
chunks = list(llm.stream(messages))
streamed = chunks[0]
for chunk in chunks[1:]:
    streamed += chunk
print(json.dumps({
    "invoke": {"content": answer.content, "usage": answer.usage_metadata,
               "finish_reason": answer.response_metadata.get("finish_reason")},
    "stream": {"content": streamed.content, "chunks": len(chunks), "usage": streamed.usage_metadata},
    "batch": [m.content for m in llm.batch(["Say hello.", "Name a colour."])],
}))
