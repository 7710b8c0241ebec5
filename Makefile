# deliverylab: build the book, run the checks, open the lab.
#
#   make book    set up .venv, execute every chapter, build the HTML into _build/html/
#                (again: only the pages that changed, or everything after a change to src/),
#                and the Japanese edition (from the saved outputs) into _build/html/ja/
#   make test    everything CI runs: lint (ruff, mypy), the translations complete, nbval,
#                the strict book build of both editions, all tests
#   make lab     JupyterLab on chapters/, on 127.0.0.1
#   make notebooks  re-execute every chapter in place, saving the outputs nbval checks
#   make bench   run every benchmarks/*.py
#   make services  start (or install) the servers the tests use: PostgreSQL, RabbitMQ, NATS, Redis, Mosquitto
#   make i18n-update  bring the translations' catalogs (locales/) up to date with the English
#   make i18n-check   fail, naming each, on any message a translation lacks or has fuzzy
#
# Setup is done once and redone only when requirements.txt or pyproject.toml change.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deliverylab-setup
KERNEL_CONFIG := $(VENV)/etc/ipython/ipython_kernel_config.py
# The digest of what the built book was made from besides its pages (scripts/book_inputs.py).
BOOK_INPUTS := _build/.book-inputs
CHROMIUM ?= /usr/bin/chromium
LAB_PORT ?= 8888
# Optional regex file for nbval, for outputs that legitimately differ between runs.
NBVAL_SANITIZE := $(wildcard nbval-sanitize.cfg)

# Run the tools of .venv, and have Jupyter prefer the kernel of .venv over any python3
# kernel registered for the user elsewhere on the machine.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export JUPYTER_PREFER_ENV_PATH := 1
# Quiets the debugger's "frozen modules" notice that every kernel prints on start.
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: help setup assets chromium services book book-strict book-ja i18n-update i18n-check \
	i18n-stats lint nbval pytest test lab notebooks bench clean

help:
	@echo "make book    build the HTML book into _build/html/ (Japanese: _build/html/ja/;"
	@echo "             a rebuild executes only what changed)"
	@echo "make book-ja build only the Japanese edition, from the saved outputs (fast)"
	@echo "make i18n-update  update the translations' catalogs after English changes"
	@echo "make i18n-check   list every untranslated or fuzzy message (fails if any)"
	@echo "make i18n-stats   messages and words per page, and how many are translated"
	@echo "make test    lint, translations complete, nbval on every chapter, strict book build, all tests"
	@echo "make lab     JupyterLab on chapters/ (http://127.0.0.1:$(LAB_PORT))"
	@echo "make notebooks  re-execute the chapters in place (after changing src/)"
	@echo "make bench   run the benchmarks"
	@echo "make services  start PostgreSQL, RabbitMQ, NATS, Redis and Mosquitto for the tests (install them if missing)"
	@echo "make clean   remove the built book and fetched assets (keeps .venv)"

# --- setup -------------------------------------------------------------------------------

setup: $(STAMP) $(KERNEL_CONFIG)

# Half of a first build (one to two minutes, more on a slow link): say so, and show
# how far it is rather than a minute of silence; pip's full output goes to a log file.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || { echo "setup: creating the virtual environment .venv/"; \
	  $(PYTHON) -m venv $(VENV); }
	@echo "setup: installing the $$(grep -c '^[A-Za-z]' requirements.txt) pinned packages of" \
	  "requirements.txt into .venv/ (once; one to two minutes, longer on a slow link)"
	@$(BIN)/python scripts/pip_install.py --log $(VENV)/pip-install.log -r requirements.txt
	@echo "setup: installing the deliverylab package itself (editable: src/ is used in place)"
	@$(BIN)/python scripts/pip_install.py --log $(VENV)/pip-install-package.log --no-deps -e .
	@touch $@

# Kernels started from .venv read this (see the file for why): it drops ipykernel's notice
# about unencrypted TCP, which every executed chapter would print, when the kernel is on loopback.
$(KERNEL_CONFIG): scripts/ipython/ipython_kernel_config.py | $(STAMP)
	@mkdir -p $(dir $@)
	@cp $< $@

# Pinned require.js, ipywidgets embed manager and MathJax for the book (no CDN).
assets: setup
	$(BIN)/python scripts/fetch_web_assets.py

# Shell lines that install the Debian packages $(1) (named $(2) in messages) with apt-get, as
# root or through sudo.
define apt_install
if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
elif command -v sudo >/dev/null; then sudo="sudo"; \
else echo "$(2) is missing and installing it needs root or sudo: apt-get install -y $(1)" >&2; exit 1; fi; \
echo "installing $(1) with apt-get"; \
$$sudo apt-get update -qq; \
DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $(1)
endef

# Chromium for the browser tests, and a Japanese font, without which the Japanese edition's
# screenshots show empty boxes.
chromium:
	@if [ ! -x "$(CHROMIUM)" ]; then $(call apt_install,chromium,Chromium); fi
	@if ! fc-list :lang=ja 2>/dev/null | grep -q .; then \
	  $(call apt_install,fonts-ipafont,A Japanese font); fi

# The servers the tests talk to (PostgreSQL on 127.0.0.1:5432, RabbitMQ on 5672, NATS with
# JetStream on 4222, Mosquitto on 1883): started if installed and stopped, installed with apt-get if missing.
# The book does not need them.
services:
	bash scripts/services.sh

# --- the book ----------------------------------------------------------------------------

# Executes only what changed. Sphinx re-reads, and so re-executes, a page it sees changed; it
# cannot see src/ (which every chapter runs) or the build's configuration, so when their digest
# differs from the last build's, or there is no build yet, everything is rebuilt and every
# chapter executed (--all). The digest is taken before the build and saved only after it
# succeeds: a change made during a build, or a full build that failed, is rebuilt in full.
book: assets
	@digest=$$(python scripts/book_inputs.py); \
	if [ -f _build/html/intro.html ] && [ "$$(cat $(BOOK_INPUTS) 2>/dev/null)" = "$$digest" ]; then \
	  echo "book: src/ and the configuration are as last built: building only the pages that changed"; \
	  jupyter-book build .; \
	else \
	  echo "book: building every page and executing every chapter (one to two minutes)"; \
	  jupyter-book build --all .; \
	fi; \
	echo "$$digest" > $(BOOK_INPUTS)
	python scripts/i18n.py build
	@echo
	@echo "The book is at _build/html/index.html, the Japanese edition at _build/html/ja/intro.html"
	@echo "  open file://$(CURDIR)/_build/html/index.html in a browser"

# Any warning fails the build, every problem is reported (not just the first). Always every
# page, every chapter executed: CI's build never trusts an earlier one. The translated
# editions too: a translation that drops a reference or breaks a link fails.
book-strict: assets
	@digest=$$(python scripts/book_inputs.py); \
	jupyter-book build --all -W -n --keep-going .; \
	echo "$$digest" > $(BOOK_INPUTS)
	python scripts/i18n.py build --strict

# The translated editions only, from the notebooks' saved outputs (seconds, no kernel): the
# loop for a translator, after `make book` has built the English edition once.
book-ja: assets
	python scripts/i18n.py build --strict

# --- translations (scripts/i18n.py) -------------------------------------------------------

# After the English changed: new messages arrive untranslated, changed ones fuzzy with their
# previous English beside them (#| msgid), in locales/<language>/LC_MESSAGES/<page>.po.
i18n-update: setup
	python scripts/i18n.py update

# Every message of every page translated, none fuzzy; otherwise each is named, with its file.
i18n-check: setup
	python scripts/i18n.py check

i18n-stats: setup
	python scripts/i18n.py stats

# --- checks ------------------------------------------------------------------------------

# ruff, and mypy on the package (its configuration, in pyproject.toml: strict on the engine
# and the brokers).
lint: setup
	ruff check .
	mypy

# Every chapter runs top to bottom and reproduces its saved outputs exactly. With notebooks
# present, collecting no cell (pytest's exit 5) is a failure, not a pass.
nbval: setup services
	@if ! compgen -G 'chapters/*.ipynb' >/dev/null; then \
	  echo "nbval: no notebooks in chapters/ yet"; exit 0; fi; \
	pytest --nbval --nbval-current-env \
	  $(if $(NBVAL_SANITIZE),--nbval-sanitize-with $(NBVAL_SANITIZE)) chapters/

# All of tests/, slow and browser tests included (the browser tests read _build/html/).
pytest: setup services
	pytest tests/

# In this order, one step at a time: the tests run last, so that the browser tests check
# the book just built.
test: setup assets chromium services
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory i18n-check
	$(MAKE) --no-print-directory nbval
	$(MAKE) --no-print-directory book-strict
	$(MAKE) --no-print-directory pytest

# --- using it ----------------------------------------------------------------------------

# The chapters start the project's kernel on open, without a "Select Kernel" dialog.
lab: setup
	mkdir -p .venv/share/jupyter/lab/settings
	cp scripts/jupyterlab/overrides.json .venv/share/jupyter/lab/settings/overrides.json
	jupyter lab --ServerApp.root_dir=chapters --ServerApp.ip=127.0.0.1 \
	  --ServerApp.port=$(LAB_PORT) $(if $(filter 0,$(shell id -u)),--allow-root)

# After a change to src/: execute every chapter in place, so the saved outputs nbval compares
# against are the engine's current ones, and give the saved widgets ids that stay put.
notebooks: setup services
	for nb in chapters/*.ipynb; do \
	  jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.record_timing=False "$$nb"; \
	done
	python scripts/stable_widget_ids.py chapters/*.ipynb

bench: setup
	@shopt -s nullglob; files=(benchmarks/*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "no benchmarks yet"; exit 0; fi; \
	for f in "$${files[@]}"; do echo "== $$f"; python "$$f"; done

clean:
	rm -rf _build build test-output
	find locales -name '*.mo' -delete
