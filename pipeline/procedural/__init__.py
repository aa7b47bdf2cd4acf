"""Procedural multi-shot videos with checkable captions: a tiny model's training data and its judge.

scenes.py: the caption language (vocabulary, grammar, parser, attribute ids, script sampling);
render.py: frames of a shot, whole videos, training batches; checker.py: scores a video against its
captions by colour segmentation; videofile.py: MP4 + JSON sidecar on disk (PyAV).
"""

from pipeline.procedural.render import Batch, iter_batches, render_shot, sample_video, shot_frame_counts
from pipeline.procedural.scenes import (COLOURS, MOTIONS, NUM_ATTRIBUTE_IDS, NUM_ATTRIBUTE_SLOTS, SHAPES,
                                        CaptionError, ShotSpec, Subject, attribute_ids, format_caption,
                                        parse_caption, sample_script, spec_from_ids)

__all__ = ["Batch", "iter_batches", "render_shot", "sample_video", "shot_frame_counts", "COLOURS", "MOTIONS",
           "NUM_ATTRIBUTE_IDS", "NUM_ATTRIBUTE_SLOTS", "SHAPES", "CaptionError", "ShotSpec", "Subject",
           "attribute_ids", "format_caption", "parse_caption", "sample_script", "spec_from_ids"]
