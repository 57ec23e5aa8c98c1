"""Run by the ai21==2.15.2 client venv (not Amber's): drives a live server with the official SDK,
unchanged, and prints what it got as JSON for the test to check. argv: base URL, API key and
the model (j2-light unless given)."""
import json
import sys

from ai21 import AI21Client, errors
from ai21.models import Penalty

url, key = sys.argv[1], sys.argv[2]
model = sys.argv[3] if len(sys.argv) > 3 else "j2-light"
client = AI21Client(api_key=key, api_host=f"{url}/studio/v1", num_retries=0)
every = dict(
    model=model, prompt="Q: What is the capital of France?\nA:", max_tokens=20, num_results=2,
    min_tokens=1, temperature=0, top_p=0.9, top_k_return=3, stop_sequences=["\n\n", "Q:"],
    frequency_penalty=Penalty(scale=0.2, apply_to_numbers=False, apply_to_emojis=True),
    presence_penalty=Penalty(scale=0.1, apply_to_whitespaces=False, apply_to_punctuation=False),
    count_penalty=Penalty(scale=0.05, apply_to_stopwords=False),
    logit_bias={"▁banana": -5.0}, epoch=1)
report = {"runs": [client.completion.create(**every).to_dict() for _ in range(2)]}
report["sampled"] = client.completion.create(model="j1-large", prompt="Tell me a story:", max_tokens=8,
                                             temperature=1.0, num_results=3).to_dict()
report["errors"] = {}
for name, call in {
    "bad_key": lambda: AI21Client(api_key="wrong", api_host=f"{url}/studio/v1", num_retries=0)
    .completion.create(model="j2-light", prompt="x"),
    "unknown_model": lambda: client.completion.create(model="j9-giant", prompt="x"),
    "bad_value": lambda: client.completion.create(model="j2-light", prompt="x", num_results=99),
}.items():
    try:
        call()
        report["errors"][name] = None
    except errors.AI21APIError as exc:
        report["errors"][name] = [type(exc).__name__, exc.status_code]
print(json.dumps(report))
