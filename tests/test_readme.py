"""The README's Python example runs as written, offline, on sieve-mini, and prints what its comments say."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_the_readme_example_runs_as_written_and_prints_what_its_comments_say():
    # one ```python block today: a new one needs its own checks here
    [block] = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, str(README), "exec"), {})  # noqa: S102 - the README's own code
    answer, run, header, image, flops = printed.getvalue().splitlines()

    assert answer == "green"
    assert run.startswith("<Run FasterVLM(keep=64) on LlavaForConditionalGeneration, removed: 1 call(s), 1 image(s), "
                          "256 -> 64 visual tokens")
    assert header.split() == ["call", "row", "grid", "before", "after"] and image.split() == ["0", "0", "16x16", "256", "64"]
    assert flops.startswith("LLM prefill:")
