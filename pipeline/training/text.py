"""The tiny model's prompt side, trainable without `transformers`: a byte-level tokenizer and a UMT5
encoder in plain torch.

The GPU machine that trains the tiny model has torch and diffusers but not transformers, while the
pipeline loads the text encoder with transformers' UMT5EncoderModel and the tokenizer with
AutoTokenizer (ByT5). So training uses these two stand-ins, which compute the same thing:
- ByteTokenizer: ByT5's ids (UTF-8 byte + 3, then </s> = 1, padding 0, truncation keeps </s>);
- UMT5Encoder: UMT5's encoder (pre-norm RMS layers, per-layer bucketed relative position bias, no
  1/sqrt(d) score scaling, gated-GELU feed-forward) with transformers' parameter names, so its
  state dict *is* a UMT5EncoderModel checkpoint; save_text_encoder writes it with a config.json
  that transformers loads. tests/test_train_tiny.py checks both against transformers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAD_ID, EOS_ID, BYTE_OFFSET = 0, 1, 3  # ByT5: <pad>, </s>, <unk>, then the 256 bytes
BYTE_VOCAB = BYTE_OFFSET + 256 + 125  # + ByT5's 125 sentinel ids: 384, as the tiny presets use


# ---------------------------------------------------------------------------------------------
# 1. Tokenizer
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenizedText:
    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64, 1 for real tokens


class ByteTokenizer:
    """ByT5's tokenization: ids = UTF-8 bytes + 3, </s> appended, padded with 0 to max_length."""

    def encode(self, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, max_length) int64 ids and (N, max_length) bool mask."""
        ids = np.full((len(prompts), max_length), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(prompts), max_length), dtype=bool)
        for i, prompt in enumerate(prompts):
            data = np.frombuffer(prompt.encode("utf-8")[:max_length - 1], dtype=np.uint8)
            ids[i, :len(data)] = data.astype(np.int64) + BYTE_OFFSET
            ids[i, len(data)] = EOS_ID
            mask[i, :len(data) + 1] = True
        return ids, mask

    def __call__(self, prompts: list[str], padding: str = "max_length", max_length: int = 512,
                 truncation: bool = True, add_special_tokens: bool = True, return_attention_mask: bool = True,
                 return_tensors: str = "pt", padding_side: str = "right") -> TokenizedText:
        """The call pipeline.models.text.encode_prompts makes on a transformers tokenizer."""
        if (padding, truncation, add_special_tokens, return_tensors, padding_side) != \
                ("max_length", True, True, "pt", "right"):
            raise ValueError("ByteTokenizer supports right padding to max_length, truncation, special tokens, "
                             "pt tensors")
        ids, mask = self.encode(list(prompts), max_length)
        return TokenizedText(torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64)))


# ---------------------------------------------------------------------------------------------
# 2. UMT5 encoder
# ---------------------------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # (N, L, d_model)


class RMSNorm(nn.Module):
    """T5's layer norm: no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_buckets(length: int, num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """(L, L) bucket of key position - query position, bidirectional (T5's encoder rule): half the
    buckets per direction, exact below num_buckets / 4, logarithmic up to max_distance."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # (query, key)
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    log_part = torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)
    large = (exact + log_part.long()).clamp(max=half - 1)
    return bucket + torch.where(rel < exact, rel, large)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, d_kv: int, heads: int, num_buckets: int, max_distance: int):
        super().__init__()
        inner = heads * d_kv
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)  # UMT5: one table per layer
        self.heads, self.num_buckets, self.max_distance = heads, num_buckets, max_distance

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x (N, L, d_model); key_bias (N, 1, 1, L) additive (padding keys very negative)."""
        n, length, _ = x.shape
        q, k, v = (proj(x).view(n, length, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        buckets = relative_buckets(length, self.num_buckets, self.max_distance, x.device)
        position = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, L, L)
        bias = position.to(q.dtype) + key_bias.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: unscaled scores
        return self.o(o.transpose(1, 2).reshape(n, length, -1))


class GatedFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))  # gelu_new


class AttentionLayer(nn.Module):
    def __init__(self, d_model, d_kv, heads, num_buckets, max_distance, eps):
        super().__init__()
        self.SelfAttention = SelfAttention(d_model, d_kv, heads, num_buckets, max_distance)
        self.layer_norm = RMSNorm(d_model, eps)

    def forward(self, x, key_bias):
        return x + self.SelfAttention(self.layer_norm(x), key_bias)


class FeedForwardLayer(nn.Module):
    def __init__(self, d_model, d_ff, eps):
        super().__init__()
        self.DenseReluDense = GatedFeedForward(d_model, d_ff)
        self.layer_norm = RMSNorm(d_model, eps)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, d_model, d_kv, d_ff, heads, num_buckets, max_distance, eps):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(d_model, d_kv, heads, num_buckets, max_distance, eps),
                                    FeedForwardLayer(d_model, d_ff, eps)])

    def forward(self, x, key_bias):
        return self.layer[1](self.layer[0](x, key_bias))


class Stack(nn.Module):
    def __init__(self, d_model, d_kv, d_ff, num_layers, heads, num_buckets, max_distance, eps):
        super().__init__()
        self.block = nn.ModuleList([Block(d_model, d_kv, d_ff, heads, num_buckets, max_distance, eps)
                                    for _ in range(num_layers)])
        self.final_layer_norm = RMSNorm(d_model, eps)


class UMT5Encoder(nn.Module):
    """UMT5EncoderModel's computation and parameter names; kwargs are UMT5Config's (the subset a
    gated-GELU encoder uses). `shared` is the token embedding (tied to encoder.embed_tokens there)."""

    def __init__(self, vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int,
                 relative_attention_num_buckets: int = 32, relative_attention_max_distance: int = 128,
                 layer_norm_epsilon: float = 1e-6, feed_forward_proj: str = "gated-gelu"):
        super().__init__()
        if feed_forward_proj != "gated-gelu":
            raise ValueError(f"model.architecture.text_encoder.feed_forward_proj: only gated-gelu is supported "
                             f"(got {feed_forward_proj!r})")
        self.config = {"vocab_size": vocab_size, "d_model": d_model, "d_kv": d_kv, "d_ff": d_ff,
                       "num_layers": num_layers, "num_heads": num_heads,
                       "relative_attention_num_buckets": relative_attention_num_buckets,
                       "relative_attention_max_distance": relative_attention_max_distance,
                       "layer_norm_epsilon": layer_norm_epsilon}
        self.shared = nn.Embedding(vocab_size, d_model)
        self.encoder = Stack(d_model, d_kv, d_ff, num_layers, num_heads, relative_attention_num_buckets,
                             relative_attention_max_distance, layer_norm_epsilon)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """UMT5's initialisation (std 1 embeddings, fan-in scaled projections)."""
        c = self.config
        d, inner = c["d_model"], c["num_heads"] * c["d_kv"]
        nn.init.normal_(self.shared.weight, std=1.0)
        for block in self.encoder.block:
            att, ff = block.layer[0].SelfAttention, block.layer[1].DenseReluDense
            nn.init.normal_(att.q.weight, std=(d * c["d_kv"]) ** -0.5)
            nn.init.normal_(att.k.weight, std=d ** -0.5)
            nn.init.normal_(att.v.weight, std=d ** -0.5)
            nn.init.normal_(att.o.weight, std=inner ** -0.5)
            nn.init.normal_(att.relative_attention_bias.weight, std=d ** -0.5)
            nn.init.normal_(ff.wi_0.weight, std=d ** -0.5)
            nn.init.normal_(ff.wi_1.weight, std=d ** -0.5)
            nn.init.normal_(ff.wo.weight, std=c["d_ff"] ** -0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        """input_ids, attention_mask (N, L) -> last_hidden_state (N, L, d_model)."""
        x = self.shared(input_ids)
        key_bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for block in self.encoder.block:
            x = block(x, key_bias)
        return EncoderOutput(self.encoder.final_layer_norm(x))


def transformers_config(encoder: UMT5Encoder, dtype: str) -> dict:
    """config.json for transformers' UMT5EncoderModel (what UMT5Config writes for these values)."""
    c = encoder.config
    return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", **c, "num_decoder_layers": c["num_layers"],
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
            "dropout_rate": 0.0, "classifier_dropout": 0.0, "initializer_factor": 1.0, "is_decoder": False,
            "is_encoder_decoder": True, "use_cache": True, "tie_word_embeddings": True, "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID, "decoder_start_token_id": PAD_ID, "dtype": dtype}


def save_text_encoder(encoder: UMT5Encoder, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write `directory`/{config.json, model.safetensors} loadable by UMT5EncoderModel.from_pretrained."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    (directory / "config.json").write_text(json.dumps(transformers_config(encoder, name), indent=2, sort_keys=True))
