"""The tiny model's training (jobs/train_tiny.py, pipeline/training/) and the weights it ships.

Stand-ins are checked against what they stand for: the byte tokenizer and UMT5 encoder against
transformers, the GPU scene renderer against pipeline.procedural's numpy renderer, the masked
moga+stga against the registry's. A smoke run trains, checkpoints, resumes and installs, and the
installed weights, loaded by the pipeline's loader, predict what the trained modules predict.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.training.data import SceneStream, draw, paraphrase, plan_batch, random_crops, scene_loader, to_video
from pipeline.training.text import ByteTokenizer, UMT5Encoder, save_text_encoder
from pipeline.training.trainer import SMOKE_ARCHITECTURE, TrainConfig, Trainer, shot_layout

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "pipeline" / "models" / "weights" / "tiny-trained"
CAPTIONS = ["a red circle moves right on a blue background", "",
            "the cyan triangle bounces up and down over a black background", "é ü " * 40]


def test_byte_tokenizer_matches_byt5():
    from transformers import ByT5Tokenizer

    ref = ByT5Tokenizer()(CAPTIONS, padding="max_length", max_length=48, truncation=True, add_special_tokens=True,
                          return_attention_mask=True, return_tensors="pt", padding_side="right")
    ours = ByteTokenizer()(CAPTIONS, max_length=48)
    assert torch.equal(ours.input_ids, ref.input_ids)
    assert torch.equal(ours.attention_mask, ref.attention_mask)


def test_umt5_encoder_is_a_transformers_checkpoint(tmp_path):
    from transformers import UMT5EncoderModel

    torch.manual_seed(0)
    ours = UMT5Encoder(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16)
    save_text_encoder(ours, tmp_path, torch.float32)
    ref = UMT5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    tok = ByteTokenizer()(CAPTIONS, max_length=40)  # longer than max_distance: the log buckets matter
    with torch.no_grad():
        expected = ref(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        got = ours(tok.input_ids, tok.attention_mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_draw_reproduces_sample_video():
    from pipeline.procedural import sample_video

    seeds = [(3, 1, 0, i) for i in range(3)]
    batch = plan_batch(0, seeds, 2, 1.0, 8, 48, 32, 0.5, 64)
    frames = draw(batch, "cpu").numpy()  # (B, F, H, W, 3)
    for i, seed in enumerate(seeds):
        shots, captions = sample_video(seed, 2, 1.0, 8, 48, 32, second_subject_prob=0.5)
        np.testing.assert_array_equal(frames[i], np.concatenate(shots))
        assert batch.captions[i] == captions
    video = to_video(torch.from_numpy(frames))
    assert video.shape == (3, 3, 17, 48, 32) and video.min() >= -1 and video.max() <= 1


def test_random_crops_are_aligned_windows_of_each_clip():
    video = torch.randn(6, 3, 5, 48, 40)
    crops = random_crops(video, 16, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 5, 16, 16)
    corners = set()
    for i in range(6):  # each crop is exactly one 8-aligned window of its own clip
        found = [(y, x) for y in range(0, 33, 8) for x in range(0, 25, 8)
                 if torch.equal(crops[i], video[i, :, :, y:y + 16, x:x + 16])]
        assert len(found) == 1
        corners.add(found[0])
    assert len(corners) > 1  # the windows differ between clips
    with pytest.raises(ValueError, match="vae_crop: 12 must be a multiple of 8"):
        random_crops(video, 12, torch.Generator())
    with pytest.raises(ValueError, match="vae_crop: 48 must be"):
        random_crops(video, 48, torch.Generator())


def test_paraphrases_keep_the_meaning():
    from pipeline.procedural import parse_caption, sample_video

    rng = np.random.default_rng(0)
    changed = 0
    for i in range(60):
        _, (caption,) = sample_video(i, 1, 1.0, 8, 16, 16, second_subject_prob=0.5)
        variant = paraphrase(caption, rng, 0.7)
        changed += variant != caption
        assert parse_caption(variant) == parse_caption(caption)
    assert changed > 30


def test_stream_batches_do_not_depend_on_workers():
    stream = SceneStream(2, 5, 2, (2, 1), 1.0, 4, 32, 32, 24, start=3)
    with_workers = scene_loader(stream, 2)
    for k in (3, 4, 5):
        got, want = next(with_workers), stream.batch(k)
        assert got.index == k and got.num_shots == (2, 1)[k % 2]
        assert torch.equal(got.x, want.x) and torch.equal(got.input_ids, want.input_ids)


def test_masked_moga_stga_matches_the_registry():
    from pipeline.attention import AttentionMeta, Routing, build_method
    from pipeline.config import build_config
    from pipeline.layout import VideoLayout
    from pipeline.training.attention import MaskedMogaStga

    torch.manual_seed(0)
    layout = VideoLayout(5, 4, 4, (3, 2))
    for merge in ("lse", "sum"):
        cfg = build_config({"model": "tiny-wan", "attention": "moga+stga",
                            "video": {"shots": [{"prompt": "x", "seconds": 1}], "height": 64, "width": 64}},
                           [("attention.merge", merge), ("attention.stga.window", [1, 2, 2])]).attention
        registry = build_method(cfg, "cpu", torch.float32)
        q, k, v = (torch.randn(2, layout.num_tokens, 2, 8, requires_grad=True) for _ in range(3))
        logits = torch.randn(2, layout.num_tokens, cfg.moga.num_groups, requires_grad=True)
        results = []
        for fn in (registry, MaskedMogaStga(cfg, registry.backend)):
            gate, groups = logits.softmax(-1).max(-1)
            o = fn(q, k, v, AttentionMeta(layout, routing=Routing(groups, gate, cfg.moga.num_groups)))
            weights = torch.linspace(-1, 1, o.numel()).view_as(o)
            results.append((o, torch.autograd.grad((o * weights).sum(), (q, k, v, logits))))
        (o_ref, g_ref), (o, g) = results
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _twin(name: str, cfg: TrainConfig, trainer_model: dict):
    from pipeline.config import build_config
    from pipeline.training.trainer import TWINS
    from pipeline.training.twin import Twin

    preset, overrides, _ = TWINS[name]
    full = build_config({"model": trainer_model, "attention": preset, "video": {
        "shots": [{"prompt": "x", "seconds": 1}], "height": cfg.height, "width": cfg.width}},
        [tuple(o.split("=", 1)) for o in overrides])
    return Twin(name, SMOKE_ARCHITECTURE, full.attention, torch.device("cpu"), 0, lr=3e-3, ema_decay=0.9)


@pytest.mark.parametrize("name", ["dense", "moga"])
def test_twin_overfits_a_fixed_batch(name):
    """The flow-matching loss falls on one fixed batch (noise, levels and prompts fixed too)."""
    from pipeline.training.trainer import _model_dict

    cfg = TrainConfig(**TrainConfig.smoke_defaults())
    twin = _twin(name, cfg, _model_dict(cfg))
    torch.manual_seed(0)
    layout = shot_layout(2, cfg.seconds_per_shot, cfg.fps, cfg.height, cfg.width)
    latents = torch.randn(2, 16, layout.frames, 2 * layout.height, 2 * layout.width)
    noise = torch.randn_like(latents)
    sigma = torch.tensor([0.3, 0.7])
    scene = plan_batch(0, [(0, 0, 0, 0), (0, 0, 0, 1)], 2, cfg.seconds_per_shot, cfg.fps, 32, 32, 0.3, 32)
    losses = []
    for _ in range(12):
        loss, parts = twin.loss(latents, noise, sigma, scene.input_ids, scene.text_mask, layout)
        twin.step(loss, 3e-3)
        losses.append(parts["flow"])
        assert (parts["balance"] > 0) == (name == "moga")
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_vae_trains_on_the_decoder_output_before_the_clamp_and_starts_narrow():
    from pipeline.training.vae import INITIAL_LOGVAR, build_vae, decode_unclamped

    torch.manual_seed(0)
    vae = build_vae(SMOKE_ARCHITECTURE["vae"])
    video = to_video(draw(plan_batch(0, [(1, 1, 0, 0)], 1, 1.0, 4, 32, 32, 0.3, 8), "cpu"))
    posterior = vae.encode(video).latent_dist
    assert torch.allclose(posterior.logvar, torch.full_like(posterior.logvar, INITIAL_LOGVAR), atol=0.5)
    with torch.no_grad():  # a louder output conv drives the raw output past [-1, 1]
        vae.decoder.conv_out.weight.mul_(20.0)
    z = torch.randn_like(posterior.mean)
    raw = decode_unclamped(vae, z)
    assert raw.abs().max() > 1.0
    assert torch.equal(raw.clamp(-1.0, 1.0), vae.decode(z).sample)


@pytest.mark.parametrize("pixel_loss", ["l1", "mse", "l1+mse", "l1-clamped"])
def test_vae_reconstruction_improves_on_a_fixed_clip(pixel_loss):
    from pipeline.training.vae import build_vae, reconstruction_loss

    torch.manual_seed(0)
    vae = build_vae(SMOKE_ARCHITECTURE["vae"])
    video = to_video(draw(plan_batch(0, [(1, 1, 0, 0)], 1, 1.0, 4, 32, 32, 0.3, 8), "cpu"))
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    l1 = []
    for i in range(6):
        loss, parts = reconstruction_loss(vae, video, 1e-4, torch.Generator().manual_seed(i), pixel_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        l1.append(parts["l1"])
    assert np.mean(l1[-2:]) < 0.8 * np.mean(l1[:2])


def test_pixel_losses_are_what_they_say():
    from pipeline.training.vae import build_vae, decode_unclamped, reconstruction_loss

    torch.manual_seed(0)
    vae = build_vae(SMOKE_ARCHITECTURE["vae"])
    video = to_video(draw(plan_batch(0, [(1, 1, 0, 0)], 1, 1.0, 4, 32, 32, 0.3, 8), "cpu"))
    with torch.no_grad():
        loss = {name: reconstruction_loss(vae, video, 0.0, torch.Generator().manual_seed(3), name)[0]
                for name in ("l1", "mse", "l1+mse")}
        posterior = vae.encode(video).latent_dist  # the same draw, by hand
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
        error = decode_unclamped(vae, z) - video
    torch.testing.assert_close(loss["l1"], error.abs().mean())
    torch.testing.assert_close(loss["mse"], (error ** 2).mean())
    torch.testing.assert_close(loss["l1+mse"], error.abs().mean() + (error ** 2).mean())


def test_clamped_l1_is_the_decoded_error_with_a_straight_through_gradient():
    from pipeline.training.vae import build_vae, decode_unclamped, reconstruction_loss

    torch.manual_seed(0)
    vae = build_vae(SMOKE_ARCHITECTURE["vae"])
    with torch.no_grad():  # a loud output conv: many raw pixels land past -1 or 1, on both sides of targets
        vae.decoder.conv_out.weight.mul_(30.0)
    video = to_video(draw(plan_batch(0, [(1, 1, 0, 0)], 1, 1.0, 4, 32, 32, 0.3, 8), "cpu"))
    captured = []

    def keep(_module, _args, out):  # each latent frame's raw output, with its gradient kept
        out.retain_grad()
        captured.append(out)

    handle = vae.decoder.register_forward_hook(keep)
    try:
        loss, parts = reconstruction_loss(vae, video, 0.0, torch.Generator().manual_seed(3), "l1-clamped")
        loss.backward()
    finally:
        handle.remove()
    raw = torch.cat([o.detach() for o in captured], dim=2)
    grad = torch.cat([o.grad for o in captured], dim=2) * raw.numel()
    assert (raw.abs() > 1).float().mean() > 0.1
    torch.testing.assert_close(loss.detach(), (raw.clamp(-1, 1) - video).abs().mean())
    torch.testing.assert_close(parts["l1_decoded"], (raw.clamp(-1, 1) - video).abs().mean())
    # independent of the implementation: right as decoded -> no gradient; otherwise the sign of the error
    right = ((video >= 1) & (raw >= 1)) | ((video <= -1) & (raw <= -1))
    expected = torch.where(right, torch.zeros_like(raw), torch.sign(raw.clamp(-1, 1) - video))
    assert right.any() and (~right & (raw.abs() > 1)).any()
    torch.testing.assert_close(grad, expected)


def test_lr_schedule_warms_up_then_follows_the_cosine_to_the_floor():
    from pipeline.training.trainer import scheduled_lr

    assert scheduled_lr(1e-3, 0, 100, 0.0, "cosine", 0.05) == pytest.approx(1e-5)
    assert scheduled_lr(1e-3, 499, 100, 0.0, "cosine", 0.05) == pytest.approx(1e-3)
    assert scheduled_lr(1e-3, 499, 100, 0.5, "cosine", 0.05) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert scheduled_lr(1e-3, 499, 100, 1.0, "cosine", 0.05) == pytest.approx(5e-5)
    assert scheduled_lr(1e-3, 499, 100, 7.0, "cosine", 0.05) == pytest.approx(5e-5)  # past the horizon: the floor
    assert scheduled_lr(1e-3, 499, 100, 0.9, "constant", 0.05) == pytest.approx(1e-3)
    lrs = [scheduled_lr(1.0, 1000, 10, p / 20, "cosine", 0.1) for p in range(21)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_contact_sheet_puts_each_video_source_in_a_row_and_frames_in_columns(tmp_path):
    from PIL import Image

    from jobs.train_tiny import main
    from pipeline.training.sheet import contact_sheet

    rng = np.random.default_rng()
    t, h, w = 9, 4, 6
    samples = {f"{source}_{video}": rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
               for video in (1, 0) for source in ("dense", "vae", "ground_truth")}
    sheet = contact_sheet(samples, columns=3)
    assert sheet.shape == (6 * h, 3 * w, 3)
    for row, key in enumerate(["ground_truth_0", "vae_0", "dense_0", "ground_truth_1", "vae_1", "dense_1"]):
        for column, frame in enumerate((0, 4, 8)):  # first, middle, last of 9 frames
            assert np.array_equal(sheet[row * h:(row + 1) * h, column * w:(column + 1) * w], samples[key][frame])
    np.savez(tmp_path / "samples.npz", **samples)
    assert main(["sheet", str(tmp_path / "samples.npz"), str(tmp_path / "s.png"), "--columns", "3"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), sheet)
    with pytest.raises(ValueError, match="'noise'"):
        contact_sheet({"noise": samples["vae_0"]})
    assert main(["sheet", str(tmp_path / "absent.npz"), str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_contact_sheet_of_a_video_is_one_row_of_its_decoded_frames(tmp_path):
    from PIL import Image

    from jobs.train_tiny import main
    from pipeline.procedural.videofile import write_mp4

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)]  # one per frame
    write_mp4(tmp_path / "v.mp4", np.stack([np.full((32, 32, 3), c, np.uint8) for c in colours]), fps=8)
    assert main(["sheet", str(tmp_path / "v.mp4"), str(tmp_path / "v.png"), "--columns", "3"]) == 0
    sheet = np.asarray(Image.open(tmp_path / "v.png")).astype(int)
    assert sheet.shape == (32, 96, 3)
    for column, frame in enumerate((0, 2, 4)):
        mean = sheet[:, column * 32:(column + 1) * 32].reshape(-1, 3).mean(0)
        assert np.abs(mean - colours[frame]).max() < 12, (column, mean)


def _smoke(out: Path, **changes) -> dict:
    values = {**TrainConfig.smoke_defaults(), "out": str(out), "vae_steps": 1, "dit_steps": 2, "val_steps": 1,
              "shot_cycle": (1,), **changes}
    return Trainer(TrainConfig(**values)).run()


def test_smoke_run_resumes_and_installs_weights_the_loader_takes(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.config import ModelConfig
    from pipeline.models import build_adapter, encode_prompts, load_model
    from pipeline.training.install import install_weights
    from pipeline.training.twin import embed_prompts

    first = _smoke(tmp_path / "run1")
    assert first["state"]["vae_done"] and first["state"]["dit_step"] == 2 and not first["dropped"]
    assert first["scores"]["ground_truth"]["mean"] > 0.9  # the checker reads the validation truth
    files = {p.name for p in (tmp_path / "run1").iterdir()}
    assert {"weights.tar", "ckpt-vae.pt", "ckpt-dense.pt", "ckpt-moga.pt", "summary.json", "samples.npz",
            "train.log"} <= files
    with np.load(tmp_path / "run1" / "samples.npz") as samples:
        assert samples["dense_0"].shape == samples["ground_truth_0"].shape

    with pytest.raises(ValueError, match="height"):  # a resumed run must keep the data's shape
        Trainer(TrainConfig(**{**TrainConfig.smoke_defaults(), "out": str(tmp_path / "bad"),
                               "resume": str(tmp_path / "run1"), "height": 48}))
    trainer = Trainer(TrainConfig(**{**TrainConfig.smoke_defaults(), "out": str(tmp_path / "run2"),
                                     "resume": str(tmp_path / "run1"), "vae_steps": 1, "dit_steps": 3,
                                     "shot_cycle": (1,), "val_videos": 0}))
    second = trainer.run()
    assert second["state"]["segment"] == 1 and second["state"]["dit_step"] == 3
    assert {n: t["steps"] for n, t in second["twins"].items()} == {"dense": 3, "moga": 3}

    reopening = Trainer(TrainConfig(**{**TrainConfig.smoke_defaults(), "out": str(tmp_path / "run3"),
                                       "resume": str(tmp_path / "run2"), "reopen_vae": True, "vae_steps": 2,
                                       "dit_steps": 1, "shot_cycle": (1,), "val_videos": 0}))
    # the reopened VAE's average starts again from its weights as trained, not from the old average
    assert reopening.vae_ema.updates == 0
    for name, p in reopening.vae.named_parameters():
        assert torch.equal(reopening.vae_ema.shadow[name], p.detach().float())
    reopened = reopening.run()
    assert reopened["state"]["vae_step"] == 2 and reopened["state"]["dit_step"] == 1  # DiTs started over
    assert {t["steps"] for t in reopened["twins"].values()} == {1}

    lines = install_weights(tmp_path / "run2" / "weights.tar", tmp_path / "weights")
    assert len(lines) == 2
    with tarfile.open(tmp_path / "run2" / "weights.tar") as tar:
        assert "tiny-trained-moga/transformer/longreel_routers.safetensors" in tar.getnames()
    assert (tmp_path / "weights" / "tiny-trained-moga" / "vae").is_symlink()

    # The installed weights, through the pipeline's loader and adapter, predict what the trained
    # modules (EMA weights) predict: tokenizer, text encoder, transformer, routers all round-trip.
    cfg = trainer.cfg
    layout = shot_layout(2, cfg.seconds_per_shot, cfg.fps, cfg.height, cfg.width)
    latents = torch.randn(1, 16, layout.frames, 2 * layout.height, 2 * layout.width)
    prompts = ["a red circle moves right on a blue background", "a red circle bounces on a green background"]
    for name, directory in (("dense", "tiny-trained"), ("moga", "tiny-trained-moga")):
        twin = trainer.twins[name]
        attention = trainer.twin_config(name).attention
        model_cfg = OmegaConf.structured(replace(ModelConfig(), path=str(tmp_path / "weights" / directory),
                                                 text_max_length=trainer.text_length))
        bundle = load_model(model_cfg, "cpu")
        adapter = build_adapter(bundle, OmegaConf.merge(attention, {"moga": {"router_init": "auto"}}))
        with torch.no_grad():
            text = encode_prompts(bundle, prompts, trainer.text_length).embeds[None]
            loaded = adapter(latents, torch.tensor([500.0]), text, layout)
            with twin.ema.applied():
                twin.use_training_attention(False)
                ids, mask = (torch.from_numpy(a) for a in ByteTokenizer().encode(prompts, trainer.text_length))
                trained = twin.adapter(latents, torch.tensor([500.0]), embed_prompts(twin.text_encoder, ids[None],
                                                                                      mask[None]), layout)
                twin.use_training_attention(True)
        torch.testing.assert_close(loaded, trained, rtol=0.02, atol=0.02)  # fp16 weights on disk
    index = json.loads((tmp_path / "weights" / "tiny-trained-moga" / "model_index.json").read_text())
    assert index["longreel_training"]["attention"] == "moga+stga" and index["longreel_training"]["steps"] == 3

    # A later session goes on from the installed weights (checkpoints do not outlive the machine).
    from safetensors.torch import load_file

    onward = Trainer(TrainConfig(**{**TrainConfig.smoke_defaults(), "out": str(tmp_path / "run4"),
                                    "init_from": str(tmp_path / "weights"), "dit_steps": 5, "shot_cycle": (1,),
                                    "val_videos": 0}))
    assert onward.state["vae_done"] and onward.state["vae_step"] == second["state"]["vae_step"]
    assert onward.state["latent_mean"] == pytest.approx(second["state"]["latent_mean"])
    onward.build_twins()
    moga_dir = tmp_path / "weights" / "tiny-trained-moga"
    installed = load_file(str(moga_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    for key, value in onward.twins["moga"].transformer.state_dict().items():
        assert torch.equal(value, installed[key].float()), key
    assert {t.steps for t in onward.twins.values()} == {3}
    onward.twins = {}
    went_on = onward.run()
    assert {n: t["steps"] for n, t in went_on["twins"].items()} == {"dense": 5, "moga": 5}
    assert went_on["state"]["vae_step"] == second["state"]["vae_step"]  # the VAE was not trained again
    with pytest.raises(ValueError, match="init_from: fps was 4"):
        Trainer(TrainConfig(**{**TrainConfig.smoke_defaults(), "out": str(tmp_path / "bad2"),
                               "init_from": str(tmp_path / "weights"), "fps": 8}))
    with pytest.raises(FileNotFoundError, match="init_from: no tiny-trained or tiny-trained-moga/model_index.json"):
        Trainer(TrainConfig(**{**TrainConfig.smoke_defaults(), "out": str(tmp_path / "bad3"),
                               "init_from": str(tmp_path / "run1")}))


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no trained weights installed in pipeline/models/weights yet")
def test_shipped_model_loads_and_generates(tmp_path):
    from pipeline.config import load_config
    from pipeline.models import build_adapter, load_model
    from pipeline.sampling.denoise import Denoiser
    from pipeline.sampling.plan import ShotPlan
    from pipeline.video.decode import StreamingDecoder

    cfg = load_config(ROOT / "configs" / "examples" / "demo.yaml",
                      ["model=tiny-trained", f"model.path={SHIPPED}", "video.height=64", "video.width=64",
                       "sampling.steps=2", "video.shots=[{prompt: a red circle moves right on a blue background, "
                                                         "seconds: 1}]"])
    size = sum(f.stat().st_size for f in SHIPPED.parent.rglob("*.safetensors") if not f.is_symlink())
    assert size <= 12 * 2**20
    bundle = load_model(cfg.model, "cpu")
    adapter = build_adapter(bundle, cfg.attention)
    plan = ShotPlan.from_config(cfg, bundle.transformer.config.in_channels)
    denoiser = Denoiser(adapter, bundle, cfg)
    frames = StreamingDecoder(bundle.vae).decode(denoiser.denoise_block(plan, plan.blocks[0]))
    assert frames.shape == (plan.pixel_frames, 64, 64, 3) and frames.dtype == np.uint8


def test_bad_training_options_fail_in_one_line_before_anything_runs(tmp_path, capsys):
    from jobs.train_tiny import main

    out = tmp_path / "never"
    assert main(["train", "--vae-crop", "60", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "train_tiny: vae_crop: 60 must be 0 or a multiple of 8 up to 128"
    assert main(["train", "--refresh-videos", "0", "--out", str(out)]) == 2
    assert "refresh_videos / refresh_every: 0 / 2" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "--vae-loss", "l2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "train_tiny: vae_loss: 'l2' is not one of l1, mse, l1+mse, l1-clamped"
    assert main(["train", "--lr-schedule", "linear", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "train_tiny: lr_schedule: 'linear' is not one of constant, cosine"
    assert main(["train", "--smoke", "--init-from", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("train_tiny: init_from: no tiny-trained or tiny-trained-moga")


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no trained weights installed in pipeline/models/weights yet")
def test_the_demo_as_shipped_is_recognised_by_the_checker(tmp_path):
    """`make demo`'s config, unchanged but for where it writes: the checker must read both shots'
    captions off the video (0.92 when the weights were installed; 0.00 with random weights)."""
    from jobs.eval_tiny import evaluate
    from pipeline import Pipeline

    result = Pipeline.from_config(ROOT / "configs" / "examples" / "demo.yaml",
                                  [f"storage.uri=file://{tmp_path}"]).generate(progress=False)
    report = evaluate(tmp_path / "demo.mp4")
    assert result.video_uri == f"file://{tmp_path}/demo.mp4"
    assert report.score >= 0.75, report
