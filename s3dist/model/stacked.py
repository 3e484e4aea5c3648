"""Parallel copies of a parameter (one per expert, one per modality) stored as one stacked tensor.

DeepSpeed's ZeRO optimizer handles every parameter *tensor* on its own each step: gradient-bucket copy
in backward, a norm for clipping, the copy back into the model after the update, about 40 dispatched ops
per tensor whatever its size. A model with many small per-expert or per-modality tensors pays that per
tensor, and its forward pays one kernel per copy. So the copies are stacked (leading dimension: the copy)
and computed together: the local experts of a MoE layer as one batched GEMM (`s3dist.model.experts`),
the modalities of a block as one batched LayerNorm / projection / attention call (`ModalityLayerNorm`,
`ModalityLinear`).

The state dict keeps each copy under its own name (`deepspeed_experts.3.fc1.weight`, `vision.weight`):
checkpoint files, exports and state dicts written before the stacking load unchanged, and DeepSpeed's
per-expert checkpoint files stay one file per expert by global index. `register_per_copy_state` installs
the two hooks that translate.

A stacked parameter carries `stacked_dims` (its number of leading copy dimensions), so the optimizer
judges weight decay by one copy's shape (`s3dist.dist.optimizer_param_groups`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (stacked parameter name, relative to the module) -> the per-copy keys, relative to the module, in copy order
PerCopyNames = Callable[[nn.Module], dict[str, list[str]]]


def mark_stacked(*params: nn.Parameter) -> None:
    """One leading copy dimension (see the module docstring)."""
    for p in params:
        p.stacked_dims = 1


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One `F.linear` per copy as a batched GEMM: x [C, R, d_in], weight [C, d_out, d_in], bias [C, d_out]
    -> [C, R, d_out]."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def register_per_copy_state(module: nn.Module, names: PerCopyNames, hint: str) -> None:
    """Save `module`'s stacked parameters as one entry per copy, and stack such entries back on load.

    `names(module)` maps each stacked parameter to its copies' keys; `hint` ends the error raised when a
    state dict has only some of the copies (e.g. "written with another number of experts?")."""

    def save(mod: nn.Module, state: dict, prefix: str, local_metadata) -> None:
        # Copy by copy (DeepSpeed's per-expert order, a ModuleDict's per-modality order). Clones, not
        # views: a view would carry the whole stacked storage into every saved file.
        per_copy = names(mod)
        stacked = {name: state.pop(prefix + name) for name in per_copy}
        for i in range(len(next(iter(per_copy.values())))):
            for name, keys in per_copy.items():
                state[prefix + keys[i]] = stacked[name][i].detach().clone()

    def load(mod: nn.Module, state: dict, prefix: str, local_metadata, strict: bool, missing_keys: list,
             unexpected_keys: list, error_msgs: list) -> None:
        for name, keys in names(mod).items():
            present = [prefix + k in state for k in keys]
            if not any(present):
                continue  # stacked name (or nothing: load_state_dict reports the missing key)
            if not all(present):
                missing = [prefix + k for k, ok in zip(keys, present) if not ok]
                error_msgs.append(f"{prefix[:-1] or type(mod).__name__}: {len(missing)} of the {len(keys)} entries "
                                  f"stacked into '{name}' are missing: {', '.join(missing[:4])}"
                                  f"{' ...' if len(missing) > 4 else ''} ({hint})")
                continue
            state[prefix + name] = torch.stack([state.pop(prefix + k) for k in keys])
        # entries beyond the copies stay: load_state_dict reports them as unexpected keys

    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)


MODALITY_HINT = "was it written for other modalities? data.modalities shapes the weights"


class ModalityLayerNorm(nn.Module):
    """One LayerNorm per modality over a modality stack `[M, ..., d]`; state dict `{modality}.weight`."""

    def __init__(self, modalities: list[str], d: int) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.weight = nn.Parameter(torch.ones(len(modalities), d))
        self.bias = nn.Parameter(torch.zeros(len(modalities), d))
        mark_stacked(self.weight, self.bias)
        register_per_copy_state(self, lambda mod: {p: [f"{m}.{p}" for m in mod.modalities] for p in ("weight", "bias")},
                                MODALITY_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        return torch.addcmul(self.bias.view(shape), F.layer_norm(x, x.shape[-1:]), self.weight.view(shape))


class ModalityLinear(nn.Module):
    """One nn.Linear per modality over a modality stack `[M, ..., d_in]`, as one batched GEMM.

    Built from per-modality `nn.Linear`s (`from_linears`), so initialisation draws what those draw, in the
    caller's order. Its state dict names are set by the owner (`register_per_copy_state`), which knows
    where the modality sits in the historical key (`attn.vision.qkv.weight`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)   # [M, d_out, d_in]
        self.bias = nn.Parameter(bias)       # [M, d_out]
        mark_stacked(self.weight, self.bias)

    @classmethod
    def from_linears(cls, linears: list[nn.Linear]) -> ModalityLinear:
        return cls(torch.stack([lin.weight.detach() for lin in linears]),
                   torch.stack([lin.bias.detach() for lin in linears]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = stacked_linear(x.reshape(x.shape[0], -1, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
