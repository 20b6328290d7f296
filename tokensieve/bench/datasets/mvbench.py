"""MVBench (Li et al., 2024): 20 temporal tasks of 200 multiple-choice questions each, `OpenGVLab/MVBench`.

Files: json/<task>.json, a list of {"video", "question", "candidates", "answer" (the right candidate's
text), and "start"/"end" in seconds for the tasks asked about one span of their video}; the videos
unzip under video/<source folder>/ (TASKS gives each task's folder, as the official evaluation notebook,
video_chat2/mvbench.ipynb in OpenGVLab/Ask-Anything, lists them). Episodic reasoning's "videos" are
folders of frames taken at 3 fps. The same rows as parquet (Hugging Face's conversion, one config per
task: <task>/**/*.parquet) load too. `videos` defaults to <data>/video. The fine-grained pose task's
NTU RGB+D videos are not in the download (they need their own licence): leave it out with `tasks=`.

Prompt (the official notebook's): the system text "Carefully watch the video ..." (meta["system"]; the
notebook gives it to the LLM as its system message), then "Question: q\\nOptions:\\n(A) c1\\n(B) c2..."
and "\\nOnly give the best option."; the notebook starts the reply with "Best option:(" (meta["answer_prefix"]).

Official scoring (the notebook's check_ans): the reply's first line is prefixed with "(" (the notebook's
return_prompt), lower-cased, and its first space-separated word, periods dropped, is compared with the
right option "(x)": right if the word is part of "(x)" or "(x)" is part of the word ("A", "A)", "(A)
cat", "a." all read as A). One guard added: a first word with no letter counts as wrong (the notebook's
substring test would pass an empty reply, since "(" is part of every "(x)"); replies with no letter are
counted as "letterless". Accuracy is over all questions, per task ("by_category") and overall.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import BenchmarkDataMissing, check_lengths, read_rows
from .options import LETTERS
from .video_files import VideoSample

REPO = "OpenGVLab/MVBench"
SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
          "movement of objects, and the action and pose of persons. Based on your observations, select the "
          "best option that accurately addresses the question.\n")
QUESTION_CUE = "\nOnly give the best option."
ANSWER_PREFIX = "Best option:("
FRAME_FOLDER_FPS = 3  # episodic reasoning's TVQA frames

# task -> (question file, video folder under <videos>, "video" or "frame" (a folder of frames), asks about a span)
TASKS: dict[str, tuple[str, str, str, bool]] = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", "video", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", "video", False),
    "Action Count": ("action_count.json", "perception/videos", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", "video", False),
    "State Change": ("state_change.json", "perception/videos", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", "video", False),
    "Character Order": ("character_order.json", "perception/videos", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", "video", False),
}


def _task_rows(data: Path, task: str) -> list[dict] | None:
    """A task's rows from json/<file>, <file>, or parquet files under <task_file_stem>/; None if absent."""
    file = TASKS[task][0]
    for path in (data / "json" / file, data / file):
        if path.is_file():
            return json.loads(path.read_text())
    parquet = sorted((data / Path(file).stem).rglob("*.parquet")) if (data / Path(file).stem).is_dir() else []
    return read_rows(parquet) if parquet else None


def question_text(question: str, candidates: list[str]) -> str:
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(candidates))
    return f"Question: {question}\nOptions:\n{options}{QUESTION_CUE}"


def load(data: Path | str | None, split: str = "train", limit: int | None = None,
         videos: Path | str | None = None, tasks: list[str] | None = None) -> list[VideoSample]:
    """MVBench's questions, each with its video resolved, in rounds: every task's first question in TASKS' order
    (or `tasks`'), then every task's second, ..., so that a `limit` spreads over the tasks."""
    if split != "train":
        raise ValueError(f"MVBench has one split, 'train' (as its Hugging Face configs name it), not {split!r}")
    unknown = sorted(set(tasks or ()) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown MVBench tasks {unknown}; known: {', '.join(TASKS)}")
    if data is None or not Path(data).is_dir():
        raise BenchmarkDataMissing("MVBench", REPO, data, "no such folder (pass the downloaded dataset folder)")
    data = Path(data)
    videos = Path(videos) if videos is not None else data / "video"
    chosen = list(tasks) if tasks else list(TASKS)
    rows_by_task = {task: _task_rows(data, task) for task in chosen}
    absent = [TASKS[task][0] for task, rows in rows_by_task.items() if rows is None]
    if absent:
        raise BenchmarkDataMissing("MVBench", REPO, data, f"no question file for {', '.join(absent)} (looked for "
                                   f"json/<file>, <file> and <file stem>/*.parquet); or pass tasks= to leave tasks out")
    rounds = max(map(len, rows_by_task.values()), default=0)
    order = [(task, index) for index in range(rounds) for task in chosen if index < len(rows_by_task[task])]
    samples, missing = [], []
    for task, index in order[:limit]:
        _, folder, kind, span = TASKS[task]
        row = rows_by_task[task][index]
        path = videos / folder / row["video"]
        if not (path.is_dir() if kind == "frame" else path.is_file()):
            missing.append(str(path))
            continue
        candidates = [str(c) for c in row["candidates"]]
        if row["answer"] not in candidates:
            raise ValueError(f"MVBench {task} row {index}: its answer {row['answer']!r} is none of its candidates")
        meta = {"answer_text": row["answer"], "options": candidates, "system": SYSTEM, "answer_prefix": ANSWER_PREFIX}
        if span:
            meta["window"] = (float(row["start"]), float(row["end"]))
        if kind == "frame":
            meta["folder_fps"] = FRAME_FOLDER_FPS
        samples.append(VideoSample(
            id=f"{Path(TASKS[task][0]).stem}#{index}", video=path, question=question_text(row["question"], candidates),
            answers=[LETTERS[candidates.index(row["answer"])]], category=task, meta=meta))
    if missing:
        raise FileNotFoundError(f"{len(missing)} MVBench videos not found (e.g. {missing[0]}): unzip the "
                                f"download's video/*.zip under {videos}, or pass videos=<that folder>, "
                                f"or leave tasks out with tasks=")
    return samples


def is_right(reply: str, letter: str) -> bool | None:
    """The official check of a reply against the right option letter; None when its first word has no letter."""
    lines = reply.strip().split("\n")
    first_word = ("(" + lines[0]).lower().split(" ")[0].replace(".", "")
    if not any(ch.isalpha() for ch in first_word):
        return None
    right = f"({letter.lower()})"
    return first_word in right or right in first_word


def score(samples: list[VideoSample], predictions: list[str]) -> dict:
    """Accuracy over all questions, per task and overall; the count of letterless replies; per-sample 0/1."""
    check_lengths(samples, predictions)
    checks = [is_right(p, s.answers[0]) for s, p in zip(samples, predictions)]
    per_sample = [float(bool(c)) for c in checks]
    by_task: dict[str, list[float]] = {}
    for sample, right in zip(samples, per_sample):
        by_task.setdefault(sample.category, []).append(right)
    return {"n": len(samples), "accuracy": sum(per_sample) / len(per_sample),
            "letterless": sum(c is None for c in checks),
            "by_category": {task: sum(v) / len(v) for task, v in sorted(by_task.items())},
            "per_sample": per_sample}
