"""ShotPlan: shots -> latent frames -> blocks, for both modes; shot cuts are block boundaries."""

import pytest

from pipeline.config import load_config
from pipeline.sampling.plan import ShotPlan

SHOTS = "video.shots=[{prompt: a, seconds: 2}, {prompt: b, seconds: 1.5}, {prompt: c, seconds: 2.5}]"


def _plan(*overrides):
    return ShotPlan.from_config(load_config(None, ["video.fps=8", SHOTS, *overrides]))


def test_joint_mode_is_one_block_over_all_shots():
    plan = _plan()
    assert plan.shot_frames == (5, 3, 5)  # 1 + round(15/4); round(12/4); round(20/4)
    assert plan.shot_pixel_frames == [17, 12, 20] and plan.pixel_frames == 49
    (block,) = plan.blocks
    assert block.shots == (0, 1, 2) and block.frames == 13 and block.pixel_frames == 49
    assert block.layout.num_tokens == 13 * 8 * 8


@pytest.mark.parametrize("block_frames, sizes", [(0, [5, 3, 5]), (2, [2, 2, 1, 2, 1, 2, 2, 1]), (4, [4, 1, 3, 4, 1])])
def test_block_mode_cuts_at_shots(block_frames, sizes):
    plan = _plan("sampling.mode=block", f"sampling.block_frames={block_frames}")
    assert [b.frames for b in plan.blocks] == sizes
    assert sum(b.pixel_frames for b in plan.blocks) == plan.pixel_frames
    cuts = {0, 5, 8, 13}  # shot boundaries in latent frames
    starts = {b.frame_start for b in plan.blocks} | {plan.blocks[-1].frame_end}
    assert cuts <= starts
    for b in plan.blocks:
        assert len(b.shots) == 1  # one prompt per block
        assert b.layout.frame_offset == b.frame_start
    assert plan.layout.block_frames == tuple(sizes)
    assert plan.blocks[0].pixel_frames == 1 + 4 * (sizes[0] - 1)


def test_describe_and_dict():
    plan = _plan("sampling.mode=block")
    d = plan.to_dict()
    assert d["tokens"] == 13 * 64 and len(d["blocks"]) == 3 and d["shot_pixel_frames"] == [17, 12, 20]
    assert "3 shots, 49 frames" in plan.describe()
