#!/usr/bin/env bash
# Build tokensieve's sdist and wheel (`python -m build`: the wheel is built from the sdist, so both must be
# complete) and check that the wheel installs anywhere: in a fresh venv, run from an empty folder (no source
# tree on the path),
#   1. the core install (the wheel, no extra) imports every core module and builds every method
#      (scripts/check_installed.py), prunes a random LLaVA (`tokensieve demo`), and `tokensieve bench`
#      and `tokensieve run` without their extras end in one line naming the pip command;
#   2. with every extra but lmms, `tokensieve run` answers with sieve-mini, built from the wheel's weights,
#      and every module but the lmms-eval bridge imports.
# TOKENSIEVE_CACHE, if set, is the sieve-mini cache step 2 uses (.ci/run passes the one its first step built:
# the assembled model is kept per hash of the wheel's own weight files, so a wheel whose weights differ from the
# source tree's is assembled again, and one without them fails). Unset: a fresh cache, built from PyPI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== build: sdist, then the wheel from it"
"$python" -c "import build" 2>/dev/null || { echo "test_wheel.sh needs 'build': $python -m pip install build" >&2; exit 1; }
if ! "$python" -m build --outdir "$work/dist" "$root" >"$work/build.log" 2>&1; then
    cat "$work/build.log"
    exit 1
fi
wheel=$(ls "$work"/dist/tokensieve-*.whl)
echo "$(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"

echo "== the wheel holds every file of the package, the weights and sample image byte for byte"
"$python" - "$wheel" "$root" <<'EOF'
import hashlib, subprocess, sys, zipfile
wheel, root = sys.argv[1:]
from pathlib import Path
tracked = subprocess.run(["git", "-C", root, "ls-files", "tokensieve"], capture_output=True, text=True)
if tracked.returncode == 0:
    expected = tracked.stdout.split()
else:  # not a git checkout: every file of the package folder but Python's caches
    expected = [str(p.relative_to(root)) for p in sorted(Path(root, "tokensieve").rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts]
with zipfile.ZipFile(wheel) as archive:
    shipped = set(archive.namelist())
    missing = [path for path in expected if path not in shipped]
    differ = [path for path in expected if path in shipped and not path.endswith(".py")
              and hashlib.sha256(archive.read(path)).digest() != hashlib.sha256(open(f"{root}/{path}", "rb").read()).digest()]
data = [path for path in expected if not path.endswith(".py")]
print(f"{len(expected)} tracked files, {len(data)} of them data: {', '.join(data)}")
if missing or differ:
    sys.exit(f"the wheel lacks {missing} and differs in {differ}")
EOF

echo "== 1. core install (no extra) in a fresh venv"
"$python" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install --quiet --no-compile --upgrade pip
# --no-compile: Python compiles what it imports; pip would compile all of torch first (minutes on 2 cores).
# The CPU torch wheel, as scripts/install.sh installs it (a looser pin would pull a multi-GB CUDA build).
"$venv_python" -m pip install --quiet --no-compile torch==2.13.0
"$venv_python" -m pip install --quiet --no-compile "$wheel"
mkdir "$work/elsewhere"
cd "$work/elsewhere"  # no source tree on the path
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
"$venv_python" "$root/scripts/check_installed.py"
"$work/venv/bin/tokensieve" methods >/dev/null
"$work/venv/bin/tokensieve" demo --method fastervlm --keep 64 | tail -1

# each command without its extra: exit 1 and one line naming the pip command (`run`'s progress display leaves a
# blank line before it)
expect_extra() {  # extra, command...
    local extra=$1 output status=0
    shift
    output=$("$@" 2>&1) || status=$?
    output=$(grep -v '^[[:space:]]*$' <<<"$output" || true)
    if [[ $status != 1 || $(wc -l <<<"$output") != 1 || $output != *"pip install 'tokensieve[$extra]'"* ]]; then
        echo "expected one line naming pip install 'tokensieve[$extra]' and exit 1 from: $* (exit $status)" >&2
        echo "$output" >&2
        exit 1
    fi
    echo "$* -> $output"
}
expect_extra bench "$work/venv/bin/tokensieve" bench --limit 1
TOKENSIEVE_CACHE="$work/empty-cache" expect_extra mini "$work/venv/bin/tokensieve" run

echo "== 2. with every extra but lmms (lmms-eval installs without its requirements: docs/lmms-eval.md)"
"$venv_python" -m pip install --quiet --no-compile "$wheel[mini,bench,calibrate,ray]"
export TOKENSIEVE_CACHE=${TOKENSIEVE_CACHE:-$work/cache}
"$work/venv/bin/tokensieve" run
"$venv_python" "$root/scripts/check_installed.py"
echo "== the wheel installs and runs: $(basename "$wheel")"
