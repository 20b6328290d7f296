"""tokensieve's built-in procedural visual QA suite: seeded scenes on real photos, seven skills, and
seeded clips of them with five skills that need time (video.py)."""

from .dataset import DATA_VERSION, SPLIT_SEEDS, Example, example, examples
from .questions import CHANCE, QA, SKILLS
from .scoring import accuracy_by_skill, format_table, is_correct, normalise
from .video import VIDEO_CHANCE, VIDEO_DATA_VERSION, VIDEO_SKILLS, VideoExample, video_example, video_examples

__all__ = ["DATA_VERSION", "SPLIT_SEEDS", "Example", "example", "examples", "CHANCE", "QA", "SKILLS",
           "accuracy_by_skill", "format_table", "is_correct", "normalise",
           "VIDEO_CHANCE", "VIDEO_DATA_VERSION", "VIDEO_SKILLS", "VideoExample", "video_example", "video_examples"]
