"""Run by the ai21==2.15.2 client venv: the custom-model flow with the official SDK, unchanged.
argv: base URL, API key, dataset file, another account's key. Prints what it got as JSON."""
import json
import sys
import time

from ai21 import AI21Client, errors

url, key, path, other_key = sys.argv[1:5]
client = AI21Client(api_key=key, api_host=f"{url}/studio/v1", num_retries=0)
other = AI21Client(api_key=other_key, api_host=f"{url}/studio/v1", num_retries=0)

created = client.dataset.create(file_path=path, dataset_name="sdk-sst2")
datasets = client.dataset.list()
dataset = next(d for d in datasets if d.dataset_name == "sdk-sst2")
fetched = client.dataset.get(dataset.id)
client.custom_model.create(dataset_id=dataset.id, model_name="sdk-sentiment", model_type="tiny", num_epochs=2)
model = next(m for m in client.custom_model.list() if m.name == "sdk-sentiment")
deadline = time.monotonic() + 180
while model.status not in ("COMPLETED", "FAILED") and time.monotonic() < deadline:
    time.sleep(0.5)
    model = client.custom_model.get(model.id)
answers = {}
for epoch in (1, 2):
    answers[epoch] = client.completion.create(model="tiny", custom_model="sdk-sentiment", epoch=epoch,
                                              prompt="Review: a joy to watch\nSentiment:", max_tokens=2,
                                              temperature=0).to_dict()
default = client.completion.create(model="tiny", custom_model="sdk-sentiment", max_tokens=2, temperature=0,
                                   prompt="Review: a joy to watch\nSentiment:").to_dict()
hidden = {}
for name, call in {"dataset.get": lambda: other.dataset.get(dataset.id),
                   "custom_model.get": lambda: other.custom_model.get(model.id),
                   "completion": lambda: other.completion.create(model="tiny", custom_model="sdk-sentiment",
                                                                 prompt="x")}.items():
    try:
        call()
        hidden[name] = "visible"
    except errors.AI21APIError as exc:
        hidden[name] = getattr(exc, "status_code", None)
print(json.dumps({
    "dataset": fetched.to_dict(), "num_datasets": len(datasets),
    "model": model.to_dict(), "other_sees": {"datasets": [d.id for d in other.dataset.list()],
                                              "models": [m.id for m in other.custom_model.list()], **hidden},
    "ids": {"dataset": dataset.id, "model": model.id},
    "answers": answers, "default": default}, default=str))
