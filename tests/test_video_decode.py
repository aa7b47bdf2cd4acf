"""Streaming causal VAE decode: blocks decoded one after another == one decode of the whole video.

Guards the internals StreamingDecoder relies on (diffusers' Wan decoder and its feature cache): a
diffusers upgrade that changes them fails here.
"""

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKLWan

from pipeline.config import CONFIG_DIR
from pipeline.video.decode import StreamingDecoder, to_uint8


@pytest.fixture(scope="module")
def vae():
    arch = yaml.safe_load((CONFIG_DIR / "models" / "tiny-wan.yaml").read_text())["architecture"]["vae"]
    g = torch.Generator().manual_seed(0)
    z = arch["z_dim"]
    # Non-trivial latent statistics, so the de-normalisation is exercised.
    torch.manual_seed(0)
    return AutoencoderKLWan(**arch, latents_mean=torch.randn(z, generator=g).tolist(),
                            latents_std=(torch.rand(z, generator=g) + 0.5).tolist()).eval()


def full_decode(vae, latents):
    """Reference: Wan's pipeline de-normalisation (z = latents * std + mean) and vae.decode in one go."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(latents * std + mean).sample  # (1, 3, F, H, W)


@pytest.mark.parametrize("blocks", [(3, 4), (1, 2, 4)])
def test_blocks_decode_bit_equal_to_full_decode(vae, blocks):
    latents = torch.randn(1, 16, sum(blocks), 4, 4, generator=torch.Generator().manual_seed(1))
    ref = full_decode(vae, latents)
    assert ref.shape == (1, 3, 1 + 4 * (sum(blocks) - 1), 32, 32)

    decoder = StreamingDecoder(vae)
    pixels, frames = [], []
    for chunk in latents.split(list(blocks), dim=2):
        expected = decoder.frames_for(chunk.shape[2])
        out = decoder.decode_pixels(chunk)
        assert out.shape[2] == expected
        pixels.append(out)
        frames.append(to_uint8(out))
    assert [p.shape[2] for p in pixels] == [1 + 4 * (blocks[0] - 1)] + [4 * t for t in blocks[1:]]
    assert torch.equal(torch.cat(pixels, 2), ref)  # bit-equal, not just close
    assert np.array_equal(np.concatenate(frames), to_uint8(ref))
    assert decoder.latent_frames == sum(blocks) and decoder.pixel_frames == ref.shape[2]


def test_blocks_without_the_carried_cache_lose_frames(vae):
    """Why the cache is carried: a fresh decode per block treats each block's first frame as the video's."""
    latents = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(2))
    independent = [StreamingDecoder(vae).decode(chunk) for chunk in latents.split([3, 4], dim=2)]
    assert sum(len(f) for f in independent) == 9 + 13 != 25


def test_decode_returns_uint8_frames_and_reset_starts_a_new_video(vae):
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    decoder = StreamingDecoder(vae)
    first = decoder.decode(latents)
    assert first.shape == (9, 32, 32, 3) and first.dtype == np.uint8
    assert len(decoder.decode(latents)) == 12  # a continuation: 4 frames per latent frame
    decoder.reset()
    assert np.array_equal(decoder.decode(latents), first)


def test_to_uint8_maps_the_range_ends_and_middle():
    video = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    assert to_uint8(video)[:, 0, 0, 0].tolist() == [0, 0, 128, 191, 255]


def test_bad_latent_shape_is_one_line(vae):
    with pytest.raises(ValueError, match=r"latents: expected \(1, 16, T >= 1, h, w\), got \(1, 4, 2, 4, 4\)"):
        StreamingDecoder(vae).decode(torch.zeros(1, 4, 2, 4, 4))


@pytest.mark.parametrize("per_chunk", [1, 2])
def test_frame_chunks_equal_the_whole_block(vae, per_chunk):
    """What VideoWriter encodes while the next chunk decodes: chunk by chunk, the same frames, bit for
    bit, across blocks (the cache carries between chunks as between blocks)."""
    latents = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(4))
    whole = StreamingDecoder(vae)
    want = [whole.decode(block) for block in latents.split([2, 3], dim=2)]
    chunked = StreamingDecoder(vae)
    got = [list(chunked.frame_chunks(block, per_chunk)) for block in latents.split([2, 3], dim=2)]
    assert [len(c) for c in got] == [-(-2 // per_chunk), -(-3 // per_chunk)]
    for block_want, block_got in zip(want, got):
        assert np.array_equal(np.concatenate(block_got), block_want)
    with pytest.raises(ValueError, match="T >= 1"):
        next(chunked.frame_chunks(latents[:, :, :0]))
