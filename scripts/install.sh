#!/usr/bin/env bash
# Install tokensieve for development into the current Python (a virtual environment if one is active):
# the CPU torch wheel, tokensieve with its test extras, lmms-eval for the bridge, and Debian's chromium
# for the report's browser tests. The README's first command runs this; .ci/run runs it in a fresh venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

# torch 2.13.0 is the local CPU wheel; a looser pin would pull a multi-GB CUDA build. A torch already
# installed (a CUDA build, say) is kept. No torchvision.
"$python" -m pip install --quiet --upgrade pip
"$python" -c "import torch" 2>/dev/null || "$python" -m pip install --quiet torch==2.13.0
"$python" -m pip install --quiet -e ".[test]"
# lmms-eval's own requirements pull torchvision and a CUDA torch: the bridge needs only what the lmms extra lists.
"$python" -m pip install --quiet --no-deps lmms-eval==0.7.3
if "$python" -c "import torchvision" 2>/dev/null; then
    echo "tokensieve: torchvision is installed and breaks transformers' image processors: $python -m pip uninstall torchvision" >&2
    exit 1
fi

# tests/test_bench_report_browser.py drives chromium through playwright, which cannot download a browser here.
if ! command -v "${TOKENSIEVE_CHROMIUM:-chromium}" >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        # wait for another apt run (an unattended upgrade, say) instead of failing on its lock
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "tokensieve: the browser tests need Chromium: run 'sudo apt-get install chromium' (Debian/Ubuntu) or set TOKENSIEVE_CHROMIUM to a Chromium binary" >&2
    fi
fi
