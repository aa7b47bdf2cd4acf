"""CarriedState: everything one video's earlier blocks leave to its later ones, per layer.

    states = CarriedState.new(adapter, cfg.sampling)      # one per video (per rank under CP)
    for block in plan.blocks:
        denoiser.denoise_block(plan, block, text, states)  # steps, then the commit pass writes the state
        store.put(key, states.to_bytes())                  # constant size: a checkpoint per block

Per layer two slots:
- attention: what the layer's attention method reads and writes through meta.state: LinearState
  (S, z) for linear attention (SANA-Video), RollingKVCache for dense layers (Wan), or a method's
  own per-video state in joint mode (lite's skip record);
- conv tail: SANA-Video's Mix-FFN temporal-conv tail, the last clean frame of the block before.
CarriedState is a sequence of the attention slots (states[layer]), so it goes wherever per-layer
slots go (the adapter's run_blocks, context parallelism's forward); the conv-tail hooks find
`conv_tails` on it.

Its size does not grow with the video: linear sums are folded into one running sum, the conv tail
is one frame, the rolling cache holds at most sink_frames + window_frames frames. Serialised with
safetensors (tensors and their names only, no pickle). In joint mode (one block) nothing carries:
the slots only hold a method's state during the block, and to_tensors() is empty.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.attention.base import StateSlot
from pipeline.attention.linear import LinearAttention, LinearState
from pipeline.models.carry import RollingCacheAttention, RollingKVCache

_KEY = re.compile(r"layer\.(\d+)\.(linear\.S|linear\.z|kv\.frames|kv\.k|kv\.v|kv\.sink_frames|kv\.window_frames|"
                  r"conv_tail)$")


def carry_kind(fn) -> str | None:
    """How a layer's attention callable carries context across blocks: "linear", "rolling" or None.
    Context-parallel wrappers hold the method they wrap in `.method`."""
    while fn is not None:
        if isinstance(fn, LinearAttention):
            return "linear"
        if isinstance(fn, RollingCacheAttention):
            return "rolling"
        fn = getattr(fn, "method", None)
    return None


class CarriedState(Sequence):
    """One video's carried state on one rank: per layer an attention slot and a conv-tail slot."""

    def __init__(self, attention: list[StateSlot | None], conv_tails: list[StateSlot | None],
                 kinds: list[str | None] | None = None, sink_frames: int = 0, window_frames: int = 0):
        """`kinds`: per layer what its attention slot carries ("linear" | "rolling") in block mode;
        None in joint mode (nothing carries). sink/window: the rolling caches' size in latent frames."""
        if len(attention) != len(conv_tails) or (kinds is not None and len(kinds) != len(attention)):
            raise ValueError(f"CarriedState: {len(attention)} attention slots, {len(conv_tails)} conv-tail slots "
                             f"and {None if kinds is None else len(kinds)} kinds")
        self.attention, self.conv_tails, self.kinds = attention, conv_tails, kinds
        self.sink_frames, self.window_frames = sink_frames, window_frames
        self.reset()

    @property
    def carries(self) -> bool:
        """Block mode: a commit pass follows each block but the last, and the slots hold its result."""
        return self.kinds is not None

    @classmethod
    def new(cls, adapter, sampling) -> "CarriedState":
        """Empty state for a video of `adapter` sampled as `sampling` (SamplingConfig) says.

        Block mode needs every layer to carry context: linear attention, or dense attention with a
        rolling KV cache; any other method is refused here, before the first block."""
        carries = sampling.mode == "block"
        attention = [StateSlot() if fn.has_state else None for fn in adapter.attention]
        kinds = [carry_kind(fn) for fn in adapter.attention] if carries else None
        if carries:
            for layer, fn in enumerate(adapter.attention):
                if kinds[layer] is None:
                    raise ValueError(f"attention.method: {fn.name} (layer {layer}) cannot carry context across blocks "
                                     f"in sampling.mode=block (linear attention carries its sums, dense attention a "
                                     f"rolling KV cache): use attention.method=dense or sampling.mode=joint")
        tails = carries and bool(getattr(adapter, "conv_tail_hooks", None))
        conv_tails = [StateSlot() if tails else None for _ in range(adapter.num_layers)]
        return cls(attention, conv_tails, kinds, int(sampling.sink_frames), int(sampling.window_frames))

    # --- the sequence of attention slots (what run_blocks indexes by layer) ----------------------
    def __len__(self) -> int:
        return len(self.attention)

    def __getitem__(self, layer):
        return self.attention[layer]

    # --- lifecycle --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the start of a video: no context, empty caches."""
        for slot in self.attention:
            if slot is not None:
                slot.value = None
        for slot in self.conv_tails:
            if slot is not None:
                slot.value = None
        for slot, kind in zip(self.attention, self.kinds or ()):
            if kind == "rolling":
                slot.value = RollingKVCache.empty(self.sink_frames, self.window_frames)

    @property
    def nbytes(self) -> int:
        """Bytes of what carries (what to_tensors() holds)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    # --- serialisation ----------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor (CPU), what a checkpoint stores. Empty in joint mode."""
        return {k: v.detach().contiguous().cpu() for k, v in self._tensors().items()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if not self.carries:
            return out
        for layer, slot in enumerate(self.attention):
            value = None if slot is None else slot.value
            if isinstance(value, LinearState):
                out[f"layer.{layer}.linear.S"], out[f"layer.{layer}.linear.z"] = value.S, value.z
            elif isinstance(value, RollingKVCache):
                out[f"layer.{layer}.kv.frames"] = value.frames
                out[f"layer.{layer}.kv.sink_frames"] = torch.tensor(value.sink_frames)
                out[f"layer.{layer}.kv.window_frames"] = torch.tensor(value.window_frames)
                if value.k is not None:
                    out[f"layer.{layer}.kv.k"], out[f"layer.{layer}.kv.v"] = value.k, value.v
            elif value is not None:
                raise ValueError(f"CarriedState: layer {layer} holds a {type(value).__name__}, which does not carry "
                                 f"across blocks")
        for layer, slot in enumerate(self.conv_tails):
            if slot is not None and slot.value is not None:
                out[f"layer.{layer}.conv_tail"] = slot.value
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> "CarriedState":
        """Replace the state with what to_tensors() gave (a checkpoint of the same model and sampling)."""
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            m = _KEY.match(name)
            if m is None or int(m.group(1)) >= len(self):
                raise ValueError(f"CarriedState: unexpected tensor {name!r} for a {len(self)}-layer model")
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = tensor.to(device)
        if layers and not self.carries:
            raise ValueError("CarriedState: a carried state was given to a video in sampling.mode=joint")
        self.reset()
        for layer, parts in sorted(layers.items()):
            tail = parts.pop("conv_tail", None)
            if tail is not None:
                if self.conv_tails[layer] is None:
                    raise ValueError(f"CarriedState: layer {layer} has no temporal conv, but the state has a conv tail")
                self.conv_tails[layer].value = tail
            if parts:
                self._load_attention(layer, parts)
        return self

    def _load_attention(self, layer: int, parts: dict[str, torch.Tensor]) -> None:
        slot = self.attention[layer]
        if slot is None:
            raise ValueError(f"CarriedState: layer {layer}'s attention keeps no state, but the state has "
                             f"{sorted(parts)}")
        if self.kinds[layer] == "linear" and set(parts) == {"linear.S", "linear.z"}:
            slot.value = LinearState.from_state_dict({"S": parts["linear.S"], "z": parts["linear.z"]})
            return
        if self.kinds[layer] != "rolling" or not {"kv.frames", "kv.sink_frames", "kv.window_frames"} <= set(parts):
            raise ValueError(f"CarriedState: layer {layer}: {sorted(parts)} is not a state this layer carries")
        sink, window = int(parts["kv.sink_frames"]), int(parts["kv.window_frames"])
        if (sink, window) != (self.sink_frames, self.window_frames):
            raise ValueError(f"sampling.window_frames: the carried cache has sink_frames={sink}, "
                             f"window_frames={window}, this video {self.sink_frames}, {self.window_frames}")
        k, v = parts.get("kv.k"), parts.get("kv.v")
        slot.value = RollingKVCache(sink, window, parts["kv.frames"].cpu().to(torch.int64), k, v)

    def to_bytes(self) -> bytes:
        """safetensors bytes of to_tensors() (names and tensors only: loading runs no code)."""
        return save_safetensors(self.to_tensors())

    def load_bytes(self, data: bytes, device: torch.device | str = "cpu") -> "CarriedState":
        return self.load_tensors(load_safetensors(data), device)

    @classmethod
    def from_bytes(cls, data: bytes, adapter, sampling, device: torch.device | str = "cpu") -> "CarriedState":
        """The state saved by to_bytes(), for a video of `adapter` sampled as `sampling`."""
        return cls.new(adapter, sampling).load_bytes(data, device)
