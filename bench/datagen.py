"""Data generation's whole loop on SST-2, through a live `amber serve` and the HTTP API as a user
would run it: generate, filter, save the kept rows as a dataset, train a custom model on them,
evaluate on the dev split. Writes bench/results/datagen.json and the `datagen` section of
docs/benchmarks.md.

    .venv/bin/python bench/datagen.py

- inputs mode: the first 8 training rows are the examples; the other 92 training inputs, without
  their labels, are labelled by the base model (j2-light) prompted with those 8 (greedy): the
  *teacher*. The custom model trained on what the filters keep is compared with that 8-shot teacher
  on the 100 dev rows: accuracy (exact match) and latency per request, one at a time, with the
  prefix cache off (each teacher prompt carries its 8 examples, as AI21's claim assumes).
- examples mode: the same 8 examples alone; the model writes 200 candidate rows (temperature 0.9, a
  fresh order of the examples per row), which are filtered, saved, trained on and evaluated alike.
Also reported: each mode's yield (kept / generated), rows per minute, the reasons rows were dropped,
and (inputs mode) how often the teacher's labels agree with SST-2's own.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REPO, amber_server, machine, update_doc_section, write_results
from custom_models import Client, accuracy, rows

RESULTS = REPO / "bench/results/datagen.json"
SHOTS = 8


def generate(client: Client, body: dict) -> tuple[dict, float]:
    began = time.perf_counter()
    r = client.http.post("/dataset/generate", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    while (job := client.http.get(f"/dataset/generate/{job_id}").json())["status"] in ("QUEUED", "RUNNING"):
        time.sleep(0.5)
    assert job["status"] == "COMPLETED", job
    return job, time.perf_counter() - began


def save(client: Client, job: dict, name: str) -> dict:
    r = client.http.post(f"/dataset/generate/{job['id']}/save", json={"dataset_name": name, "split_ratio": 0.1})
    assert r.status_code == 200, r.text
    return r.json()


def all_rows(client: Client, job: dict) -> list[dict]:
    out, offset = [], 0
    while True:
        page = client.http.get(f"/dataset/generate/{job['id']}/rows", params={"offset": offset, "limit": 500}).json()
        out += page["rows"]
        offset += 500
        if offset >= page["total"]:
            return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=200, help="examples mode: rows to write")
    parser.add_argument("--redraw", action="store_true", help="only redraw docs/benchmarks.md from the results file")
    args = parser.parse_args()
    if args.redraw:
        return redraw()
    train, dev = rows("train"), rows("dev")
    seeds, inputs = train[:SHOTS], train[SHOTS:]
    truth = {r["prompt"]: r["completion"].strip() for r in inputs}
    few_shot = "".join(s["prompt"] + s["completion"] + "\n" for s in seeds)
    results: dict = {"shots": SHOTS, "dev_rows": len(dev), "modes": {}}
    with tempfile.TemporaryDirectory() as home:
        with amber_server(Path(home)) as (url, key, _):
            client = Client(url, key)
            bodies = {
                "inputs": {"mode": "inputs", "model": "j2-light", "examples": seeds,
                           "inputs": [r["prompt"] for r in inputs], "maxTokens": 4},
                "examples": {"mode": "examples", "model": "j2-light", "examples": seeds, "n": args.candidates,
                             "maxTokens": 64, "temperature": 0.9},
            }
            for mode, body in bodies.items():
                job, seconds = generate(client, body)
                made = all_rows(client, job)
                dataset = save(client, job, f"sst2-{mode}")
                model, train_seconds = client.train(dataset["id"], f"sst2-{mode}")
                entry = {"generated": job["result"]["generated"], "kept": job["result"]["kept"],
                         "yield": job["result"]["yield"], "reasons": job["result"]["reasons"],
                         "generation_seconds": round(seconds, 1), "rows_per_minute": job["result"]["rowsPerMinute"],
                         "dataset_rows": dataset["numExamples"], "training_seconds": round(train_seconds, 1),
                         "custom_model": model["name"]}
                if mode == "inputs":
                    agree = [r["output"].strip() == truth[r["input"]] for r in made if r["input"] in truth]
                    entry["teacher_label_agreement"] = sum(agree) / len(agree)
                else:
                    entry["sample_rows"] = [{"input": r["input"], "output": r["output"], "flags": r["flags"]}
                                            for r in made[:6]]
                results["modes"][mode] = entry
        # each request alone, prefix cache off: what a prompt with its examples really costs
        with amber_server(Path(home), "--prefix-cache-blocks", "0", "--no-worker") as (url, key, _):
            client = Client(url, key)
            prompts, answers = [r["prompt"] for r in dev], [r["completion"] for r in dev]
            results["teacher"] = accuracy(client, "j2-light", [few_shot + p for p in prompts], answers)
            for mode, entry in results["modes"].items():
                entry["dev"] = accuracy(client, f"j2-light/{entry['custom_model']}", prompts, answers)
                entry["points_vs_teacher"] = 100 * (entry["dev"]["accuracy"] - results["teacher"]["accuracy"])
                entry["speedup_vs_teacher"] = results["teacher"]["mean_latency_s"] / entry["dev"]["mean_latency_s"]
    write_results(RESULTS, results)
    update_doc_section("datagen", table(results))
    print(json.dumps(results, indent=2))


def redraw() -> None:
    """The docs section again from the last results file (`--redraw`)."""
    update_doc_section("datagen", table(json.loads(RESULTS.read_text())))


def table(r: dict) -> str:
    t, rows_ = r["teacher"], []
    for mode, e in r["modes"].items():
        d = e["dev"]
        rows_.append(f"| {mode} | {e['generated']} | {e['kept']} ({e['yield']:.0%}) | {e['rows_per_minute']:.0f} | "
                     f"{e['training_seconds']:.0f} | {d['accuracy']:.0%} ({e['points_vs_teacher']:+.0f} pts) | "
                     f"{d['mean_latency_s'] * 1000:.0f} ms ({e['speedup_vs_teacher']:.2f}x faster) |")
    agreement = r["modes"]["inputs"].get("teacher_label_agreement")
    reasons = "; ".join(f"{mode}: {e['reasons'] or 'none'}" for mode, e in r["modes"].items())
    cpu = r.get("machine") or machine()  # the run's own, when redrawn from its file
    return "\n".join([
        f"Machine: {cpu['cpu']}, {cpu['cores']} cores ({', '.join(cpu['flags'])}), torch {cpu['torch']}.",
        "",
        f"SST-2, {r['shots']} training rows as the examples, j2-light (SmolLM2-135M-Instruct) as the teacher; "
        f"{r['dev_rows']} dev rows, greedy, exact match, one request at a time, prefix cache off.",
        "",
        "| mode | generated | kept (yield) | rows/min | training (s) | custom model on dev | mean latency |",
        "|---|---|---|---|---|---|---|",
        *rows_,
        f"| {r['shots']}-shot teacher | | | | | {t['accuracy']:.0%} | {t['mean_latency_s'] * 1000:.0f} ms |",
        "",
        f"Teacher labels agreeing with SST-2's own (inputs mode): {agreement:.0%}. Rows dropped, by reason: {reasons}.",
    ])


if __name__ == "__main__":
    main()
