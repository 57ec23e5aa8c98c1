"""Where a short request's time goes: tokenizing, the engine alone (a ~30-token prompt and one token,
prompt scored or not), then the same through HTTP on a kept-alive connection (J2 complete, which
scores the prompt; OpenAI completions, which does not), and /health as the bare HTTP round trip.
Each also for the same prompt again and again, which the prefix cache answers without computing:
what is left there is the server's own time.

    .venv/bin/python bench/ttft_parts.py      (uses .amber-bench, as bench/engine.py does)
"""
import sys, time, statistics, threading, httpx
sys.path.insert(0, "bench")
from pathlib import Path
from common import amber_server, REPO
from amber.engine.loader import load_model
from amber.engine.tokenizer import Tokenizer
from amber.engine.engine import Engine
from amber.engine.types import GenerationRequest, SamplingParams
words = (REPO / "tests/data/sst2/dev.jsonl").read_text().split()
ck = REPO / ".amber-bench/checkpoints/smollm2-135m-instruct"
tok = Tokenizer.from_pretrained(ck)
prompts = [" ".join(words[i*20:i*20+24]) for i in range(40)]
t = time.perf_counter(); [tok.encode(p) for p in prompts]; print("encode ms each", 1000*(time.perf_counter()-t)/40)
e = Engine.launch(lambda: (load_model(ck, "int4", kernel_cache=REPO/".amber-bench/kernels"), tok))
def one(ids, score):
    done = threading.Event(); t = time.perf_counter()
    e.submit(GenerationRequest(str(time.perf_counter_ns()), tuple(ids), SamplingParams(temperature=0, max_tokens=1), score_prompt=score), lambda o: done.set())
    done.wait(); return time.perf_counter() - t
for score in (False, True):
    one(tok.encode(prompts[0]), score)
    ts = [one(tok.encode(p), score) for p in prompts[1:21]]
    print("engine score_prompt", score, "median ms", round(1000*statistics.median(ts),1), "steps ms", [round(1000*s,1) for s,_ in list(e.step_times)[-3:]])
    ts = [one(tok.encode(prompts[0]), score) for _ in range(20)]
    print("engine score_prompt", score, "same prompt again, median ms", round(1000*statistics.median(ts),1))
e.stop()
with amber_server(REPO / ".amber-bench") as (url, key, proc):
    c = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60)
    for path, body in (("/studio/v1/j2-light/complete", lambda p: {"prompt": p, "maxTokens": 1}),
                       ("/v1/completions", lambda p: {"model": "j2-light", "prompt": p, "max_tokens": 1})):
        for p in prompts[:3]: c.post(url + path, json=body(p))
        ts = []
        for p in prompts[3:23]:
            t = time.perf_counter(); r = c.post(url + path, json=body(p)); ts.append(time.perf_counter() - t); r.raise_for_status()
        print(path, "median ms", round(1000*statistics.median(ts),1))
        ts = []
        for _ in range(20):
            t = time.perf_counter(); r = c.post(url + path, json=body(prompts[0])); ts.append(time.perf_counter() - t); r.raise_for_status()
        print(path, "same prompt again, median ms", round(1000*statistics.median(ts),1))
    ts = []
    for _ in range(20):
        t = time.perf_counter(); c.get(url + "/health"); ts.append(time.perf_counter() - t)
    print("/health median ms", round(1000*statistics.median(ts),1))
