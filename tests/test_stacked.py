"""Per-modality parameters stacked (`s3dist.model.stacked`): the batched modules compute what one module
per modality computes, shorter modalities padded into the stack do not change anything, and the state dict
keeps the per-modality names (so checkpoints and exports from before the stacking load). Also the input
projection's cached position table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s3dist.config import RunConfig
from s3dist.dist import optimizer_param_groups
from s3dist.model.encoder import InputProjection, S3Encoder, SelfAttention, _stack, attention_keys
from s3dist.model.stacked import ModalityLayerNorm, ModalityLinear

MODS = ["text", "audio", "video"]


def test_modality_layernorm_and_linear_equal_one_module_per_modality():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g, requires_grad=True)
    norm = ModalityLayerNorm(MODS, 6)
    lins = [nn.Linear(6, 7) for _ in MODS]
    lin = ModalityLinear.from_linears(lins)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(3, 6, generator=g))
        norm.bias.copy_(torch.randn(3, 6, generator=g))
    y = lin(norm(x))
    y.square().sum().backward()
    for i in range(3):
        xi = x.detach()[i].clone().requires_grad_()
        ln = nn.LayerNorm(6)
        with torch.no_grad():
            ln.weight.copy_(norm.weight[i])
            ln.bias.copy_(norm.bias[i])
        yi = lins[i](ln(xi))
        torch.testing.assert_close(y[i], yi)
        yi.square().sum().backward()
        torch.testing.assert_close(x.grad[i], xi.grad)
        torch.testing.assert_close(norm.weight.grad[i], ln.weight.grad)
        torch.testing.assert_close(lin.weight.grad[i], lins[i].weight.grad)
        torch.testing.assert_close(lin.bias.grad[i], lins[i].bias.grad)


def test_padding_a_shorter_modality_into_the_stack_changes_nothing():
    """Attention over a stack where 'audio' (3 steps) is padded to 'text''s 6 equals each modality's
    attention alone, with its own weights, over its own steps (and masks), for every sample with a real step."""
    torch.manual_seed(0)
    d, heads = 8, 2
    attn = SelfAttention(["text", "audio"], d, heads)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 6, d, generator=g), torch.randn(4, 3, d, generator=g)]
    vs = [torch.rand(4, 6, generator=g) > 0.3, torch.rand(4, 3, generator=g) > 0.3]
    vs[1][0] = False  # a sample with no real step: attends everywhere, never NaN
    out = attn(_stack(xs), attention_keys(_stack(vs)))
    assert out.shape == (2, 4, 6, d) and torch.isfinite(out).all()
    for i, (x, v) in enumerate(zip(xs, vs)):
        b, t, _ = x.shape
        q, k, vv = F.linear(x, attn.qkv.weight[i], attn.qkv.bias[i]).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        keys = v | ~v.any(1, keepdim=True)
        y = F.scaled_dot_product_attention(q, k, vv, attn_mask=keys[:, None, None, :])
        want = F.linear(y.transpose(1, 2).reshape(b, t, d), attn.out.weight[i], attn.out.bias[i])
        real = v.any(1)  # a sample with no real step is never pooled nor routed: its values are free
        torch.testing.assert_close(out[i, real, :t], want[real])


def _encoder(mods=("text", "audio")):
    cfg = RunConfig()
    cfg.model.d_model, cfg.model.num_heads = 8, 2
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden = 4, 2, 8
    torch.manual_seed(0)
    return S3Encoder({m: 3 + i for i, m in enumerate(mods)}, cfg.model, cfg.moe)


def test_state_dict_keeps_per_modality_names_and_round_trips():
    enc = _encoder()
    state = enc.state_dict()
    for key in ("blocks.0.attn_norm.text.weight", "blocks.1.attn.audio.qkv.weight", "blocks.0.attn.text.out.bias",
                "blocks.1.ffn_norm.audio.bias", "final_norm.text.weight", "blocks.0.ffn.moes.0.deepspeed_moe.gate.proj.audio.weight"):
        assert key in state, key
    assert not [k for k in state if k.endswith(("attn_norm.weight", "attn.qkv.weight", "gate.proj"))]
    assert state["blocks.1.attn.audio.qkv.weight"].shape == (24, 8)
    torch.testing.assert_close(state["blocks.1.attn.audio.qkv.weight"], enc.blocks[1].attn.qkv.weight[1])
    other = _encoder()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(state)
    for (n, a), (_, b) in zip(enc.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n


def test_state_dict_of_other_modalities_is_refused_by_name():
    state = _encoder(("text", "audio")).state_dict()
    del state["blocks.0.attn.audio.qkv.weight"]
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn: 1 of the 2 entries stacked into 'qkv\.weight' are missing: "
                       r"blocks\.0\.attn\.audio\.qkv\.weight \(was it written for other modalities"):
        _encoder(("text", "audio")).load_state_dict(state)


def test_weight_decay_judges_one_modality_copy():
    """A stacked LayerNorm weight is [M, d] (2-D) but one modality's is a vector: no decay; a stacked
    projection [M, out, in] decays."""
    enc = _encoder()
    groups = optimizer_param_groups(list(enc.parameters()), 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    blk = enc.blocks[0]
    assert id(blk.attn_norm.weight) not in decayed and id(blk.ffn_norm.bias) not in decayed
    assert id(enc.final_norm.weight) not in decayed and id(blk.attn.qkv.bias) not in decayed
    assert id(blk.attn.qkv.weight) in decayed and id(blk.attn.out.weight) in decayed
    assert id(blk.ffn.routers[0].proj) in decayed


def test_input_positions_count_real_steps_from_a_table_that_grows():
    """The sinusoidal positions come from a table built once and looked up: they equal the closed form, a
    sample padded at the front gets at its first real step what an unpadded sample gets at step 0, a longer
    sequence than the table rebuilds it, and padded steps are zero even where the features are NaN."""
    torch.manual_seed(0)
    d = 6
    proj = InputProjection(3, d)
    half = d // 2
    freq = torch.exp(torch.arange(half) * (-math.log(10000.0) / half))
    p = torch.arange(5.0).unsqueeze(-1) * freq
    torch.testing.assert_close(proj.positions(5, torch.float32, torch.device("cpu")), torch.cat([p.sin(), p.cos()], -1))
    x = torch.randn(2, 5, 3)
    x[1, :2] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :2] = False  # sample 1 starts two steps late
    x[1, 2:] = x[0, :3]
    out = proj(x, mask)
    torch.testing.assert_close(out[1, 2:], out[0, :3])
    assert (out[1, :2] == 0).all()
    xl = torch.randn(1, 12, 3)
    p = torch.arange(12.0).unsqueeze(-1) * freq
    with torch.no_grad():
        pe = proj(xl, torch.ones(1, 12, dtype=torch.bool)) - proj.proj(xl)
    torch.testing.assert_close(pe[0], torch.cat([p.sin(), p.cos()], -1))
