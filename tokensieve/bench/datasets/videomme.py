"""Video-MME (Fu et al., 2024): four-option questions on 900 videos of 11 s to 1 h, `lmms-lab/Video-MME`.

Columns: video_id, duration ("short", "medium", "long"), domain (6), sub_category (30), url, videoID
(the YouTube id, the video's file name), question_id, task_type (12), question, options (four strings
already lettered, "A. ..."), answer (a letter). One parquet file, videomme/test-00000-of-00001.parquet;
the videos come as videos_chunked_NN.zip in the same download, and unzip to data/<videoID>.mp4 (a few
.MP4 or .mkv). `load` finds a video as <videos>/<videoID>.<ext> or <videos>/data/<videoID>.<ext>
(`videos` defaults to the downloaded dataset folder). The prompt is the official subtitle-free one (Video-MME's
README): the instruction, the question, the four options, then "The best answer is:".

Official scoring (the Video-MME repository's evaluation/eval_your_results.py):
- The letter: the reply is stripped and these phrases deleted: "The best answer is", "The correct
  answer is", "The answer is", "The answer", and two strings that a missing comma in the official list
  joins ("The best option isThe correct option is", "Best answer:Best option:"); the letter is then the
  first capital A, B, C or D anywhere in what is left, else none. (So "Answer: C" reads as A, from
  "Answer": the official rule, kept.)
- Accuracy = right / answered, where a question counts as answered only when a letter was read:
  replies with no letter leave the denominator. `score` reports that ("accuracy", overall and per
  duration, domain, sub-category and task type) and also right / all questions ("accuracy_all", which
  lmms-eval's port reports) with the count of unanswered questions, since a reduction method that
  breaks the model's replies would otherwise lose nothing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from .common import Sample, check_lengths, parquet_files, read_rows
from .video_files import VideoSample

REPO = "lmms-lab/Video-MME"
INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
               "Respond with only the letter (A, B, C, or D) of the correct option.")
ANSWER_CUE = "The best answer is:"
DURATIONS = ("short", "medium", "long")
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")
# As the official list reads: two missing commas join four of its phrases into two strings.
REMOVED_PHRASES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option isThe correct option is", "Best answer:Best option:")


def find_video(videos: Path, video_id: str) -> Path | None:
    """<videos>/<id>.<ext> or <videos>/data/<id>.<ext>, the first that exists."""
    for folder in (videos, videos / "data"):
        for suffix in VIDEO_SUFFIXES:
            if (path := folder / f"{video_id}{suffix}").is_file():
                return path
    return None


def load(data: Path | str | None, split: str = "test", limit: int | None = None,
         videos: Path | str | None = None, duration: str | None = None) -> list[VideoSample]:
    """Video-MME's questions (of one duration if given), each with its video file resolved under `videos`."""
    if duration is not None and duration not in DURATIONS:
        raise ValueError(f"unknown Video-MME duration {duration!r}; choose one of {DURATIONS}")
    files = parquet_files("Video-MME", REPO, data, split)
    rows = [r for r in read_rows(files) if duration is None or r["duration"] == duration][:limit]
    if videos is None:  # the download's own folder: data itself, or the folder above videomme/<file>.parquet
        videos = Path(data) if Path(data).is_dir() else files[0].parent.parent
    samples, missing = [], []
    for row in rows:
        path = find_video(videos, row["videoID"])
        if path is None:
            missing.append(row["videoID"])
            continue
        options = [str(option) for option in row["options"]]
        samples.append(VideoSample(
            id=str(row["question_id"]), video=path,
            question="\n".join([INSTRUCTION, row["question"], *options, ANSWER_CUE]),
            answers=[row["answer"].strip()], category=row["task_type"],
            meta={"duration": row["duration"], "domain": row["domain"], "sub_category": row["sub_category"],
                  "video_id": row["videoID"], "options": options}))
    if missing:
        raise FileNotFoundError(
            f"{len(set(missing))} Video-MME videos not found under {videos} (e.g. {missing[0]}.mp4, looked for as "
            f"<videos>/<videoID>.mp4 and <videos>/data/<videoID>.mp4): unzip the download's videos_chunked_*.zip "
            f"there, or pass videos=<the folder that holds them>")
    return samples


def answer_letter(reply: str) -> str | None:
    """The option letter Video-MME's official script reads from a reply, or None."""
    reply = reply.strip()
    for phrase in REMOVED_PHRASES:
        reply = reply.replace(phrase, "")
    found = re.search(r"[ABCD]", reply)
    return found.group(0) if found else None


def _accuracy(rights: list[float | None]) -> float:
    answered = [r for r in rights if r is not None]
    return sum(answered) / len(answered) if answered else 0.0


def score(samples: list[Sample | VideoSample], predictions: list[str]) -> dict:
    """Official accuracy (over answered questions) overall and per duration, domain, sub-category and task
    type ("by_category"); accuracy over all questions; the unanswered count; per-sample 0/1."""
    check_lengths(samples, predictions)
    letters = [answer_letter(p) for p in predictions]
    rights = [None if letter is None else float(letter == s.answers[0]) for s, letter in zip(samples, letters)]
    groups: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for sample, right in zip(samples, rights):
        groups["by_category"][sample.category].append(right)
        for key in ("duration", "domain", "sub_category"):
            groups[f"by_{key}"][sample.meta[key]].append(right)
    per_sample = [right or 0.0 for right in rights]
    return {"n": len(samples), "accuracy": _accuracy(rights), "accuracy_all": sum(per_sample) / len(per_sample),
            "unanswered": sum(right is None for right in rights),
            **{name: {key: _accuracy(v) for key, v in sorted(by.items())} for name, by in groups.items()},
            "per_sample": per_sample}
