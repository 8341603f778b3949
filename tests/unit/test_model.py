"""The torch network: reference key layout, architecture inference, folding, attention algebra."""

import pytest
import torch

from helpers.models import tiny_loaded_model
from rddm_infer.model import UNetConfig, UnetRes, fold_weight_standardization, infer_unet_config, to_export_form
from rddm_infer.model.unet import LayerNorm, LinearAttention, Attention, use_sdpa

# A sample of the reference's parameter names (UnetRes(share_encoder=0) and =1, dim_mults=(1, 2)).
REFERENCE_KEYS_TWO_UNETS = [
    "unet0.init_conv.weight", "unet0.time_mlp.1.weight", "unet0.time_mlp.3.bias",
    "unet0.downs.0.0.mlp.1.weight", "unet0.downs.0.0.block1.proj.weight", "unet0.downs.0.0.block1.norm.bias",
    "unet0.downs.0.2.fn.norm.g", "unet0.downs.0.2.fn.fn.to_qkv.weight", "unet0.downs.0.2.fn.fn.to_out.0.weight",
    "unet0.downs.0.2.fn.fn.to_out.1.g", "unet0.downs.0.3.weight", "unet0.downs.1.3.weight",
    "unet0.mid_block1.block2.proj.bias", "unet0.mid_attn.fn.norm.g", "unet0.mid_attn.fn.fn.to_qkv.weight",
    "unet0.mid_attn.fn.fn.to_out.weight", "unet0.ups.0.0.res_conv.weight", "unet0.ups.0.3.1.weight",
    "unet0.ups.1.3.weight", "unet0.final_res_block.res_conv.weight", "unet0.final_conv.weight",
    "unet1.final_conv.bias",
]
REFERENCE_KEYS_SHARED = [
    "init_conv.weight", "downs.0.0.block1.proj.weight", "mid_attn.fn.fn.to_out.weight",
    "ups.0.0.res_conv.weight", "ups_no_skip.0.0.block1.proj.weight", "ups_no_skip.0.3.1.weight",
    "final_res_block_1.block1.proj.weight", "final_conv_1.weight", "final_res_block_2.res_conv.weight",
    "final_conv_2.bias",
]


def test_state_dict_keys_follow_the_reference():
    two = UnetRes(UNetConfig(dim=8, dim_mults=(1, 2), share_encoder=0)).state_dict()
    shared = UnetRes(UNetConfig(dim=8, dim_mults=(1, 2), share_encoder=1)).state_dict()
    assert set(REFERENCE_KEYS_TWO_UNETS) <= set(two)
    assert set(REFERENCE_KEYS_SHARED) <= set(shared)
    assert "ups_no_skip.0.0.res_conv.weight" not in shared  # no skip: dim_out -> dim_out
    assert two["unet0.downs.0.3.weight"].shape == (8, 8, 4, 4)  # strided 4×4 conv downsample
    assert two["unet0.downs.1.3.weight"].shape == (16, 8, 3, 3)  # last level: plain 3×3
    assert two["unet0.init_conv.weight"].shape == (8, 6, 7, 7)  # x_t ‖ x_input


@pytest.mark.parametrize("cfg", [
    UNetConfig(dim=8, dim_mults=(1, 2), share_encoder=0),
    UNetConfig(dim=16, dim_mults=(1, 2, 4), share_encoder=1),
    UNetConfig(dim=8, dim_mults=(1, 2, 2, 4), share_encoder=-1),
    UNetConfig(dim=8, dim_mults=(1, 2), share_encoder=0, input_condition=True),
    UNetConfig(dim=8, dim_mults=(1, 2), share_encoder=0, condition=False, channels=1),
])
def test_architecture_inferred_from_state_dict(cfg):
    assert infer_unet_config(UnetRes(cfg).state_dict()) == cfg


def test_outputs_and_size_multiple():
    cfg = UNetConfig(dim=8, dim_mults=(1, 2, 4))
    assert cfg.size_multiple == 4 and cfg.in_channels == 6 and cfg.num_outputs == 2
    out = UnetRes(cfg)(torch.randn(2, 6, 12, 20), torch.tensor([0, 999]))
    assert [tuple(o.shape) for o in out] == [(2, 3, 12, 20)] * 2


def test_folding_weight_standardisation_keeps_outputs():
    m = tiny_loaded_model(share_encoder=0)
    x, t = torch.randn(1, 6, 16, 16), torch.tensor([599])
    with torch.no_grad():
        before = m.net(x, t)
        fold_weight_standardization(m.net)
        after = m.net(x, t)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5)


def _reference_linear_attention(mod, x):
    """The reference's einsum formulation."""
    b, c, h, w = x.shape
    q, k, v = (a.reshape(b, mod.heads, -1, h * w) for a in mod.to_qkv(x).chunk(3, dim=1))
    q, k = q.softmax(dim=-2) * mod.scale, k.softmax(dim=-1)
    v = v / (h * w)
    ctx = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", ctx, q).reshape(b, -1, h, w)
    return mod.to_out(out)


def _reference_attention(mod, x):
    b, c, h, w = x.shape
    q, k, v = (a.reshape(b, mod.heads, -1, h * w) for a in mod.to_qkv(x).chunk(3, dim=1))
    sim = torch.einsum("bhdi,bhdj->bhij", q * mod.scale, k)
    out = torch.einsum("bhij,bhdj->bhid", sim.softmax(dim=-1), v)
    return mod.to_out(out.permute(0, 1, 3, 2).reshape(b, -1, h, w))


def test_matmul_attention_equals_reference_einsum():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 10)
    lin, full = LinearAttention(16), Attention(16)
    with torch.no_grad():
        assert torch.allclose(lin(x), _reference_linear_attention(lin, x), atol=1e-5)
        assert torch.allclose(full(x), _reference_attention(full, x), atol=1e-5)


def test_export_form_modules_equal_the_reference_form():
    torch.manual_seed(2)
    x = 8 * torch.randn(2, 16, 6, 10)  # large activations: saturated softmaxes exercise the max subtraction
    lin, full, norm = LinearAttention(16), Attention(16), LayerNorm(16)
    with torch.no_grad():
        norm.g.uniform_(0.5, 2.0)
        expected = _reference_linear_attention(lin, x), _reference_attention(full, x), norm(x)
        for mod in (lin, full, norm):
            mod.export_form = True
        got = lin(x), full(x), norm(x)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-5, rtol=1e-5)


def test_export_form_network_keeps_outputs():
    m = tiny_loaded_model(share_encoder=0)
    x, t = torch.randn(2, 6, 16, 24), torch.tensor([999, 199])
    with torch.no_grad():
        before = m.net(x, t)
        after = to_export_form(m.net)(x, t)
    assert all(mod.export_form for mod in m.net.modules() if isinstance(mod, (LayerNorm, LinearAttention, Attention)))
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5)


def test_fused_sdpa_attention_equals_the_exported_matmul_form():
    torch.manual_seed(1)
    m = tiny_loaded_model(share_encoder=0)
    x, t = torch.randn(2, 6, 16, 24), torch.tensor([999, 199])
    with torch.no_grad():
        ref = m.net(x, t)
        fused = use_sdpa(m.net)(x, t)
    assert all(isinstance(a, Attention) and a.sdpa for a in m.net.modules() if isinstance(a, Attention))
    for a, b in zip(ref, fused):
        assert torch.allclose(a, b, atol=1e-5)
