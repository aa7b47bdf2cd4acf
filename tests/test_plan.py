"""ShotPlan: shots -> latent frames (rounding rules) -> pixel frames -> blocks, in both modes."""

import pytest

from pipeline.config import load_config
from pipeline.sampling.plan import ShotPlan

# 8 fps: 16, 12 and 20 pixel frames asked for
SHOTS = "video.shots=[{prompt: a, seconds: 2}, {prompt: b, seconds: 1.5}, {prompt: c, seconds: 2.5}]"


def _plan(*overrides, shots=SHOTS):
    return ShotPlan.from_config(load_config(None, ["video.fps=8", "video.height=128", "video.width=96", shots,
                                                   *overrides]))


@pytest.mark.parametrize("seconds, fps, frames", [
    ([2], 8, [5]),  # 16 frames: 1 + round(15 / 4) = 1 + 4
    ([2.5], 8, [6]),  # 20: 1 + round(19 / 4 = 4.75)
    ([1.125], 8, [3]),  # 9: 1 + round(8 / 4): the 1 + 4k frame counts Wan is trained on are exact
    ([0.25], 8, [1]),  # 2: 1 + round(0.25) = 1
    ([2, 1.5, 2.5], 8, [5, 3, 5]),  # later shots round(f / 4): 12 -> 3, 20 -> 5
    ([2, 0.75], 8, [5, 2]),  # 6 / 4 = 1.5 rounds half up
    ([2, 0.25], 8, [5, 1]),  # 2 / 4 = 0.5 rounds up; never below 1
    ([5, 5], 24, [31, 30]),  # 120 frames: 1 + round(119 / 4 = 29.75); 120 / 4
])
def test_latent_frames_follow_the_rounding_rules(seconds, fps, frames):
    shots = "video.shots=[" + ", ".join(f"{{prompt: p{i}, seconds: {s}}}" for i, s in enumerate(seconds)) + "]"
    plan = _plan(f"video.fps={fps}", shots=shots)
    assert list(plan.shot_frames) == frames
    assert plan.pixel_frames == 1 + 4 * (sum(frames) - 1)
    assert plan.shot_pixel_frames == [1 + 4 * (frames[0] - 1)] + [4 * n for n in frames[1:]]
    assert sum(plan.shot_pixel_frames) == plan.pixel_frames


def test_joint_mode_is_one_block_over_all_shots():
    plan = _plan()
    assert plan.shot_frames == (5, 3, 5) and plan.shot_pixel_frames == [17, 12, 20] and plan.pixel_frames == 49
    (block,) = plan.blocks
    assert (block.index, block.frame_start, block.frame_end) == (0, 0, 13)
    assert block.shots == (0, 1, 2) and block.pixel_frames == 49
    # token grid: latent frames x height / 16 x width / 16
    assert (plan.layout.frames, plan.layout.height, plan.layout.width) == (13, 8, 6)
    assert block.layout.num_tokens == 13 * 8 * 6 and block.layout.shot_frames == (5, 3, 5)
    assert plan.latent_shape(block) == (1, 16, 13, 16, 12)


def test_block_mode_without_block_frames_is_a_block_per_shot():
    plan = _plan("sampling.mode=block")
    assert [(b.frame_start, b.frame_end) for b in plan.blocks] == [(0, 5), (5, 8), (8, 13)]
    assert [b.shots for b in plan.blocks] == [(0,), (1,), (2,)]
    assert [b.pixel_frames for b in plan.blocks] == plan.shot_pixel_frames == [17, 12, 20]
    assert [b.layout.frame_offset for b in plan.blocks] == [0, 5, 8]
    assert [b.layout.first_shot for b in plan.blocks] == [0, 1, 2]


@pytest.mark.parametrize("block_frames, sizes, shots", [
    (4, [4, 4, 4, 1], [(0,), (0, 1), (2,), (2,)]),
    (5, [5, 5, 3], [(0,), (1, 2), (2,)]),
    (6, [6, 6, 1], [(0, 1), (1, 2), (2,)]),
    (20, [13], [(0, 1, 2)]),
])
def test_block_frames_cut_the_video_evenly_across_shots(block_frames, sizes, shots):
    plan = _plan("sampling.mode=block", f"sampling.block_frames={block_frames}")
    assert [b.frames for b in plan.blocks] == sizes and [b.shots for b in plan.blocks] == shots
    assert [b.index for b in plan.blocks] == list(range(len(sizes)))
    assert plan.layout.block_frames == tuple(sizes)
    start = 0
    for b in plan.blocks:
        assert b.frame_start == start == b.layout.frame_offset
        assert b.layout.frames == b.frames and b.layout.num_tokens == b.frames * 8 * 6
        assert b.pixel_frames == (1 + 4 * (b.frames - 1) if b.index == 0 else 4 * b.frames)
        start = b.frame_end
    assert sum(b.pixel_frames for b in plan.blocks) == plan.pixel_frames
    for b in plan.blocks:  # latent frame f of a block is frame frame_start + f of the video, same shot
        video_shot = plan.layout.frame_shot[b.frame_start:b.frame_end]
        assert (b.layout.frame_shot + b.layout.first_shot).tolist() == video_shot.tolist()


def test_describe_and_dict():
    plan = _plan("sampling.mode=block")
    d = plan.to_dict()
    assert d["tokens"] == 13 * 48 and len(d["blocks"]) == 3 and d["shot_pixel_frames"] == [17, 12, 20]
    assert d["blocks"][1] == {"index": 1, "latent_frames": [5, 8], "shots": [1], "pixel_frames": 12, "tokens": 144}
    text = plan.describe()
    assert text.startswith("3 shots, 49 frames (6.125 s at 8 fps), 96x128") and "block 2: latent frames 8-12" in text
