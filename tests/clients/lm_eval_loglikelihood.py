"""Run by the lm-eval client venv (not Amber's): lm-evaluation-harness, unchanged, scores a small
local multiple-choice task through its `local-completions` model pointed at a live server, and
prints each choice's token ids and lm-eval's (loglikelihood, is_greedy) as JSON for the test to
check. argv: base URL, API key, tokenizer directory, task YAML, batch size.

Requests go as token ids (`tokenized_requests`): `{"prompt": [[ids], ...], "max_tokens": 1,
"echo": true, "logprobs": 1}`; lm-eval sums `token_logprobs[ctxlen:-1]`, so it counts on the one
generated token being listed last, end-of-text included."""
import os
import sys
import tempfile

# Nothing may come from a hub, and nothing lands in the user's caches; set before the imports.
cache = tempfile.TemporaryDirectory()
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=cache.name)

import contextlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import lm_eval  # noqa: E402
import yaml  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

url, key, tokenizer, task_file, batch_size = sys.argv[1:6]
os.environ["OPENAI_API_KEY"] = key  # local-completions sends it as the bearer token

task = yaml.safe_load(Path(task_file).read_text())
files = task["dataset_kwargs"]["data_files"]
task["dataset_kwargs"]["data_files"] = {split: str(Path(task_file).parent / f) for split, f in files.items()}

lm = get_model("local-completions")(
    model="j2-light", base_url=f"{url}/v1/completions", tokenizer_backend="huggingface", tokenizer=tokenizer,
    tokenized_requests=True, batch_size=int(batch_size), max_retries=1)
with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
    results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                                      log_samples=True)

choices = []
for sample in results["samples"][task["task"]]:
    for index, ((context, continuation), resp) in enumerate(zip(sample["arguments"], sample["resps"])):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)  # what lm-eval sent
        loglikelihood, is_greedy = resp[0]
        choices.append({"doc": sample["doc_id"], "choice": index, "context": context, "continuation": continuation,
                        "context_ids": context_ids, "continuation_ids": continuation_ids,
                        "loglikelihood": loglikelihood, "is_greedy": is_greedy})
print(json.dumps({"choices": choices, "acc": results["results"][task["task"]]["acc,none"]}))
