#!/usr/bin/env bash
# The vLLM plugin's tests (docs/vllm.md), in the vLLM environment: builds it if needed (scripts/vllm_env.sh), builds
# the tiny LLaVA with the main environment's Python (tokensieve's transformers) and the tiny Qwen2-VL/2.5-VL/3-VL with
# the venv's, then runs vllm_plugin/tests: the offline engines (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL), then `vllm serve`
# (LLaVA, Qwen2-VL; one engine each: each start costs a minute or more on a 2-core CPU).
# Usage: bash scripts/test_vllm.sh [pytest args]    Environment: PYTHON (main env, default python3), TOKENSIEVE_VLLM_VENV,
# TOKENSIEVE_VLLM_TEST_MODEL, TOKENSIEVE_VLLM_TEST_QWEN (where the test models are built).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TOKENSIEVE_VLLM_VENV:-.venv-vllm}
bash scripts/vllm_env.sh "$venv"
venv_python="$(cd "$venv" && pwd)/bin/python"  # absolute: the tests run from vllm_plugin/tests
model=${TOKENSIEVE_VLLM_TEST_MODEL:-$(${PYTHON:-python3} -c "from tokensieve.mini.build import cache_root; print(cache_root() / 'vllm-test-llava')")}
${PYTHON:-python3} vllm_plugin/tests/build_tiny_llava.py "$model"
export TOKENSIEVE_VLLM_TEST_MODEL=$model
# the tiny Qwen2-VL/2.5-VL/3-VL: saved by vLLM's own transformers (< 5.20), which must load their configs and processors
qwen=${TOKENSIEVE_VLLM_TEST_QWEN:-$(dirname "$model")/vllm-test-qwen2-vl}
"$venv_python" vllm_plugin/tests/build_tiny_qwen2_vl.py "$qwen"
"$venv_python" vllm_plugin/tests/build_tiny_qwen3_vl.py "$qwen"
export TOKENSIEVE_VLLM_TEST_QWEN=$qwen
unset TOKENSIEVE_VLLM_METHOD  # the tests choose methods themselves
cd vllm_plugin/tests
"$venv_python" -m pytest -p no:cacheprovider -q "${@:-.}"
