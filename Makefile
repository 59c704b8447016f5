# The two set-up commands: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= out

.PHONY: demo test test-compat docs bench venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# Stamps re-run the install when setup.py changes.
$(VENV)/.installed-local: setup.py | $(PY)
	$(PIP) install --quiet -e '.[local,hub]'
	touch $@

$(VENV)/.installed-dev: setup.py | $(PY)
	$(PIP) install --quiet -e '.[local,hub,dev]'
	touch $@ $(VENV)/.installed-local

venv: $(VENV)/.installed-dev

# The main job on the embedded SmolLM2-135M model, for both roles: 4 pairs from the 5
# seeds of examples/demo_seeds.jsonl (a sample of examples/seeds.jsonl: every distinct
# use case and skills of the seeds becomes a pool entry, with a rubrics and a decode call
# each), outputs under out/. Two rounds (the method's default is four) and 5 basic
# instructions (one in reserve: the default is twice the pairs asked) keep it within
# three minutes on two cores; answers get 192 tokens (a cut one is asked again with another
# seed, not re-sent with more room: this model rambles), and one that runs
# past them is a dead letter, never a cut answer. With one model on both sides the judge
# sees no gap, so --keep_unresolved keeps the better answer of what is still undecided
# after the last round (real runs leave it off). It ends by tracing one pair through the
# method (`codeclm-beam show`).
demo: $(VENV)/.installed-local
	$(VENV)/bin/codeclm-beam generate \
	  --seeds examples/demo_seeds.jsonl --output_dir $(OUT)/demo \
	  --strong_model llamacpp:smollm2-135m --target_model llamacpp:smollm2-135m \
	  --num_examples 4 --num_instructions 5 --num_metadata 4 --max_iterations 2 \
	  --max_output_tokens 192 --max_truncation_retries 0 \
	  --codec_max_output_tokens 384 --keep_unresolved \
	  --export_format openai --export_format alpaca
	$(VENV)/bin/codeclm-beam show $(OUT)/demo

# The test files spread over up to 4 workers, one a core (TEST_WORKERS=0: one process).
# A worker that dies of a native crash is named by pytest-xdist with its test; should a
# signal kill pytest itself, name the tests that were under way.
TEST_WORKERS ?= auto
test: $(VENV)/.installed-dev
	@$(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile; rc=$$?; \
	if [ $$rc -gt 128 ]; then \
	  echo "make test: pytest was killed by signal $$((rc - 128)) in" \
	    "$$(cat .pytest_cache/running-test* 2>/dev/null || echo 'an unknown test')" >&2; \
	fi; exit $$rc

# The other end of the supported range (setup.py): Python 3.13 with the oldest Beam the
# plugin supports, installed first and left in place by ours, as in a user's pipeline.
# Everything but the embedded model (its llama.cpp compile is the `local` extra).
COMPAT_PYTHON ?= $(shell PYENV_VERSION=3.13.0 pyenv which python3.13 2>/dev/null || command -v python3.13)
COMPAT_BEAM ?= 2.71.0
COMPAT := .venv-compat
$(COMPAT)/.installed: setup.py
	$(COMPAT_PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(COMPAT)/bin/python -m pip install --quiet 'apache-beam[gcp,yaml]==$(COMPAT_BEAM)'
	$(COMPAT)/bin/python -m pip install --quiet -e '.[dev]'
	$(COMPAT)/bin/python -c "import apache_beam, sys; v = apache_beam.__version__; \
	  assert v == '$(COMPAT_BEAM)', f'our install replaced the floor Beam with {v}'"
	touch $@

test-compat: $(COMPAT)/.installed
	@$(COMPAT)/bin/python -c "import apache_beam, sys; \
	  print(f'compatibility pass: Python {sys.version.split()[0]}, Beam {apache_beam.__version__}')"
	$(COMPAT)/bin/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile \
	  -m "not embedded" -p no:cacheprovider

# The documentation site (mkdocs.yml) into build/site, strict: a broken link, a missing
# anchor or a page left out of the navigation fails the build.
$(VENV)/.installed-docs: setup.py | $(PY)
	$(PIP) install --quiet -e '.[docs]'
	touch $@

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Side-by-side measurements -> benchmarks/results/latest.{json,md}. BENCH_SCALE=0.3
# for a quick run.
PEERS := benchmarks/.venv-peers
$(PEERS)/.installed: benchmarks/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet -r benchmarks/peers/requirements.txt
	$(PEERS)/bin/python benchmarks/peers/setup_tiktoken_cache.py benchmarks/.tiktoken-cache
	touch $@

bench: $(VENV)/.installed-dev $(PEERS)/.installed
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(COMPAT) $(OUT) .pytest_cache build .hypothesis
