"""Frame arithmetic and the token <-> (t, y, x, shot) maps attention methods rely on."""

import pytest
import torch

from pipeline.layout import VideoLayout, pixel_frames, shot_latent_frames, shot_pixel_frames


@pytest.mark.parametrize("seconds, fps, expected", [
    ([2, 2], 8, [5, 4]),          # 16 frames: first shot 1 + round(15/4) = 5, then round(16/4) = 4
    ([1], 16, [5]),               # 16 -> 1 + round(3.75) = 5 latent frames -> 17 pixel frames
    ([5.0625], 16, [21]),         # Wan's 81 frames: 1 + 80/4 = 21
    ([10] * 6, 16, [41] + [40] * 5),  # the minute example: 241 latent frames
    ([0.2, 0.1], 10, [1, 1]),     # at least one latent frame per shot
    ([1.0, 0.75], 10, [3, 2]),    # 1 + round(9 / 4 = 2.25) = 3; round(7.5 / 4 = 1.875) = 2
    ([0.5, 0.5], 12, [2, 2]),     # 1 + round(1.25) = 2; round(1.5) = 2 (half up)
])
def test_shot_latent_frames(seconds, fps, expected):
    assert shot_latent_frames(seconds, fps) == expected


def test_pixel_frames_follow_the_1_plus_4k_rule():
    assert pixel_frames(21) == 81 and pixel_frames(1) == 1 and pixel_frames(0) == 0
    shots = shot_latent_frames([10] * 6, 16)
    assert sum(shot_pixel_frames(shots)) == pixel_frames(sum(shots)) == 961
    assert shot_pixel_frames([5, 4]) == [17, 16]


def test_minute_example_token_count():
    shots = shot_latent_frames([10] * 6, 16)
    layout = VideoLayout(sum(shots), 480 // 16, 832 // 16, tuple(shots))
    assert layout.num_tokens == 241 * 30 * 52 == 375_960


def test_token_maps_match_frame_major_order():
    layout = VideoLayout(frames=5, height=3, width=4, shot_frames=(2, 3), block_frames=(1, 4))
    coords = layout.token_coords()
    shot, block = layout.token_shot(), layout.token_block()
    assert coords.shape == (60, 3)
    for t in range(5):
        for y in range(3):
            for x in range(4):
                i = layout.token_index(t, y, x)
                assert coords[i].tolist() == [t, y, x]
                assert shot[i] == (0 if t < 2 else 1)
                assert block[i] == (0 if t < 1 else 1)
    assert layout.shot_token_range(1) == (24, 60)


def test_frames_slice_keeps_absolute_positions_and_shots():
    layout = VideoLayout(frames=9, height=2, width=2, shot_frames=(5, 4))
    block = layout.frames_slice(3, 7)
    assert block.frames == 4 and block.frame_offset == 3
    assert block.shot_frames == (2, 2) and block.first_shot == 0
    late = layout.frames_slice(6, 9)
    assert late.shot_frames == (3,) and late.first_shot == 1 and late.frame_offset == 6
    assert torch.equal(late.token_coords(absolute=True)[:, 0].unique(), torch.tensor([6, 7, 8]))


def test_text_tokens_come_first():
    layout = VideoLayout(frames=2, height=2, width=2, text_tokens=3)
    assert layout.num_tokens == 11 and layout.token_index(0, 0, 0) == 3
    assert layout.shot_token_range(0) == (3, 11)


def test_bad_splits_are_rejected():
    with pytest.raises(ValueError, match="shot_frames"):
        VideoLayout(frames=4, height=1, width=1, shot_frames=(2, 3))
    with pytest.raises(ValueError, match="block_frames"):
        VideoLayout(frames=4, height=1, width=1, block_frames=(0, 4))
