"""Run by the ai21==2.15.2 client venv (not Amber's): J2 chat (`client.chat.create`) with the
official SDK, unchanged; prints what it got as JSON. argv: base URL, API key and the model
(j2-light unless given)."""
import json
import sys

from ai21 import AI21Client
from ai21.models import ChatMessage, Penalty, RoleType

url, key = sys.argv[1], sys.argv[2]
model = sys.argv[3] if len(sys.argv) > 3 else "j2-light"
client = AI21Client(api_key=key, api_host=f"{url}/studio/v1", num_retries=0)
response = client.chat.create(
    model=model, system="You are a concise geography teacher.",
    messages=[ChatMessage(role=RoleType.USER, text="What is the capital of France?"),
              ChatMessage(role=RoleType.ASSISTANT, text="Paris."),
              ChatMessage(role=RoleType.USER, text="And of Italy?")],
    num_results=2, max_tokens=16, temperature=0, stop_sequences=["\n\n"],
    count_penalty=Penalty(scale=0.1, apply_to_stopwords=False))
print(json.dumps(response.to_dict()))
