"""The reference RDDM network (``Unet`` / ``UnetRes``), re-implemented for torch.

Parameter names match nachifur/RDDM exactly, so its checkpoints load without any
renaming. Two deliberate differences from the reference, neither changing fp32 results:

* attention is written with ``matmul`` rather than ``einsum`` (Einsum dominated ONNX
  Runtime's kernel time on CPU);
* the norms keep their fp32 epsilon (1e-5) in every dtype; the reference silently
  switches to 1e-3 under half precision.

Weight standardisation can be folded into constant weights for export
(:func:`fold_weight_standardization`), and :func:`to_export_form` also rewrites the norms and
attentions into the same math in the op shapes ONNX Runtime runs fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters (what the reference's ``UnetRes`` takes)."""

    dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 3
    share_encoder: int = 0  # 0: two UNets, 1: shared encoder + two decoders, -1: one UNet
    condition: bool = True  # x_input concatenated to x_t
    input_condition: bool = False  # an extra conditioning image
    resnet_block_groups: int = 8
    init_dim: int | None = None
    heads: int = 4
    dim_head: int = 32

    def __post_init__(self):
        object.__setattr__(self, "dim_mults", tuple(int(m) for m in self.dim_mults))
        if self.share_encoder not in (-1, 0, 1):
            raise ValueError("share_encoder must be -1, 0 or 1")

    @property
    def in_channels(self) -> int:
        return self.channels * (1 + int(self.condition) + int(self.input_condition))

    @property
    def num_outputs(self) -> int:
        return 1 if self.share_encoder == -1 else 2

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.dim_mults) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**{k: (tuple(v) if k == "dim_mults" else v) for k, v in d.items() if k in cls.__dataclass_fields__})


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv whose weight is standardised per output channel (Qiao et al. 2019)."""

    standardize = True

    def forward(self, x):
        w = self.weight
        if self.standardize:
            w = standardized(w)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def standardized(w: torch.Tensor) -> torch.Tensor:
    w32 = w.float()
    mean = w32.mean(dim=(1, 2, 3), keepdim=True)
    var = w32.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return ((w32 - mean) * torch.rsqrt(var + EPS)).to(w.dtype)


class LayerNorm(nn.Module):
    """Channel LayerNorm with a gain only (parameter ``g``)."""

    export_form = False  # one LayerNormalization over a channels-last view instead of 8 strided passes

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        if self.export_form:
            y = F.layer_norm(x.permute(0, 2, 3, 1), (self.g.shape[1],), self.g.reshape(-1), None, EPS)
            return y.permute(0, 3, 1, 2)
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + EPS) * self.g


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.fn = fn
        self.norm = LayerNorm(dim)

    def forward(self, x):
        return self.fn(self.norm(x))


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000) / (half - 1)))
        emb = t.float()[:, None] * freqs[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class Block(nn.Module):
    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim, dim_out, *, time_emb_dim, groups=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, t_emb):
        scale_shift = self.mlp(t_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class _QKVAttention(nn.Module):
    """Shared by both attentions: a 1×1 conv to q, k, v, split into heads as (b, heads, dim_head, h·w)."""

    export_form = False  # three 1×1 convs on slices of the weight: no copy splitting a 3×-wide output

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_qkv = nn.Conv2d(dim, dim_head * heads * 3, 1, bias=False)

    def qkv(self, x):
        b, _, h, w = x.shape
        if self.export_form:
            parts = (F.conv2d(x, wi) for wi in self.to_qkv.weight.chunk(3, dim=0))
        else:
            parts = self.to_qkv(x).chunk(3, dim=1)
        return (a.reshape(b, self.heads, -1, h * w) for a in parts)


class LinearAttention(_QKVAttention):
    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__(dim, heads, dim_head)
        self.to_out = nn.Sequential(nn.Conv2d(dim_head * heads, dim, 1), LayerNorm(dim))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x)  # b h d n
        k = k.softmax(dim=-1)
        context = torch.matmul(k, v.transpose(-1, -2)) / (h * w)  # b h d e
        if self.export_form:  # q's softmax (over d, a strided axis) normalised after the matmul instead
            e = torch.exp(q - q.amax(dim=-2, keepdim=True))
            out = torch.matmul(context.transpose(-1, -2) * self.scale, e) / e.sum(dim=-2, keepdim=True)
        else:
            q = q.softmax(dim=-2) * self.scale
            out = torch.matmul(context.transpose(-1, -2), q)  # b h e n
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(_QKVAttention):
    """Full attention (the middle block). ``sdpa=True`` uses fused kernels (flash / memory-efficient on GPU:
    no N×N tensor); the default writes MatMul/Softmax, which every exporter and runtime handles."""

    sdpa = False

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__(dim, heads, dim_head)
        self.to_out = nn.Conv2d(dim_head * heads, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (a.transpose(-1, -2) for a in self.qkv(x))  # b h n d
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = torch.matmul(torch.matmul(q * self.scale, k.transpose(-1, -2)).softmax(dim=-1), v)  # b h n d
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


def use_sdpa(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every full attention of ``model`` to fused scaled-dot-product kernels (torch inference on GPU)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.sdpa = enabled
    return model


def attention_layout(net: nn.Module, size_multiple: int) -> list[dict]:
    """Every attention of ``net`` as the runtime's memory estimate needs it (the artifact's ``attention``
    metadata): kind (full: a tokens² matrix per head; linear), the input's downscale, heads, dim_head,
    channels and how many such layers. Measured by one small forward pass, so it states what the network
    does, not a convention about where UnetRes puts which attention."""
    side = 2 * max(int(size_multiple), 1)
    seen: list[tuple] = []

    def record(m, inputs, _out):
        x = inputs[0]
        kind = "full" if isinstance(m, Attention) else "linear"
        seen.append((kind, side // x.shape[-1], m.heads, m.to_qkv.out_channels // (3 * m.heads), x.shape[1]))

    p = next(net.parameters())
    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, _QKVAttention)]
    try:
        with torch.no_grad():
            net(torch.zeros(1, net.config.in_channels, side, side, device=p.device, dtype=p.dtype),
                torch.zeros(1, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    keys = ("kind", "downscale", "heads", "dim_head", "channels")
    return [dict(zip(keys, k), count=seen.count(k)) for k in sorted(set(seen))]


def _attn(dim, cfg):
    return Residual(PreNorm(dim, LinearAttention(dim, cfg.heads, cfg.dim_head)))


def _up(dim_in, dim_out, last):
    if last:
        return nn.Conv2d(dim_in, dim_out, 3, padding=1)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


class _Encoder(nn.Module):
    """Shared stem of ``Unet`` and the shared-encoder ``UnetRes`` (same attribute names)."""

    def _build_encoder(self, cfg: UNetConfig):
        init_dim = cfg.init_dim or cfg.dim
        self.init_conv = nn.Conv2d(cfg.in_channels, init_dim, 7, padding=3)
        dims = [init_dim, *(cfg.dim * m for m in cfg.dim_mults)]
        self.in_out = list(zip(dims[:-1], dims[1:]))
        self.time_dim = cfg.dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(cfg.dim), nn.Linear(cfg.dim, self.time_dim), nn.GELU(),
                                      nn.Linear(self.time_dim, self.time_dim))
        block = self._block = lambda a, b: ResnetBlock(a, b, time_emb_dim=self.time_dim, groups=cfg.resnet_block_groups)
        self.downs = nn.ModuleList()
        for i, (din, dout) in enumerate(self.in_out):
            last = i == len(self.in_out) - 1
            down = nn.Conv2d(din, dout, 3, padding=1) if last else nn.Conv2d(din, dout, 4, 2, 1)
            self.downs.append(nn.ModuleList([block(din, din), block(din, din), _attn(din, cfg), down]))
        mid = dims[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid, cfg.heads, cfg.dim_head)))
        self.mid_block2 = block(mid, mid)

    def _decoder(self, cfg, skip: bool):
        ups = nn.ModuleList()
        for i, (din, dout) in enumerate(reversed(self.in_out)):
            last = i == len(self.in_out) - 1
            cin = dout + din if skip else dout
            ups.append(nn.ModuleList([self._block(cin, dout), self._block(cin, dout), _attn(dout, cfg),
                                      _up(dout, din, last)]))
        return ups

    def encode(self, x, time):
        x = self.init_conv(x)
        r = x
        emb, mlp = self.time_mlp[0](time), self.time_mlp[1:]  # the embedding is fp32: match half-precision weights
        t = mlp(emb.to(mlp[0].weight.dtype))
        hs = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t)
            hs.append(x)
            x = attn(block2(x, t))
            hs.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        return x, r, t, hs

    @staticmethod
    def decode(ups, x, t, hs=None):
        hs = list(hs) if hs is not None else None
        for block1, block2, attn, up in ups:
            if hs is not None:
                x = torch.cat((x, hs.pop()), dim=1)
            x = block1(x, t)
            if hs is not None:
                x = torch.cat((x, hs.pop()), dim=1)
            x = up(attn(block2(x, t)))
        return x


class Unet(_Encoder):
    """One UNet: (x, t) -> image-shaped output."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self._build_encoder(cfg)
        self.ups = self._decoder(cfg, skip=True)
        self.final_res_block = self._block(cfg.dim * 2, cfg.dim)
        self.final_conv = nn.Conv2d(cfg.dim, cfg.channels, 1)

    def forward(self, x, time):
        x, r, t, hs = self.encode(x, time)
        x = self.decode(self.ups, x, t, hs)
        return self.final_conv(self.final_res_block(torch.cat((x, r), dim=1), t))


class UnetRes(_Encoder):
    """The reference's two-output network; ``forward`` returns a tuple (out0[, out1]).

    ``share_encoder=1`` keeps one encoder with a skip-free decoder for the residual and a
    skip decoder for the noise, at the top level as in the reference's state_dict.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        if cfg.share_encoder == 1:
            self._build_encoder(cfg)
            self.ups = self._decoder(cfg, skip=True)
            self.ups_no_skip = self._decoder(cfg, skip=False)
            self.final_res_block_1 = self._block(cfg.dim, cfg.dim)
            self.final_conv_1 = nn.Conv2d(cfg.dim, cfg.channels, 1)
            self.final_res_block_2 = self._block(cfg.dim * 2, cfg.dim)
            self.final_conv_2 = nn.Conv2d(cfg.dim, cfg.channels, 1)
        else:
            self.unet0 = Unet(cfg)
            if cfg.share_encoder == 0:
                self.unet1 = Unet(cfg)

    def forward(self, x, time):
        """``time``: (B,), or (B, 2) for two UNets fed the reference's [ᾱ_t·T, β̄_t·T] (one column each)."""
        if time.ndim == 2:
            if self.config.share_encoder != 0:
                raise ValueError("a (B, 2) time input needs two UNets; select the column for one network")
            return self.unet0(x, time[:, 0]), self.unet1(x, time[:, 1])
        if self.config.share_encoder == 0:
            return self.unet0(x, time), self.unet1(x, time)
        if self.config.share_encoder == -1:
            return (self.unet0(x, time),)
        x, r, t, hs = self.encode(x, time)
        out_res = self.final_conv_1(self.final_res_block_1(self.decode(self.ups_no_skip, x, t), t))
        y = self.decode(self.ups, x, t, hs)
        out_noise = self.final_conv_2(self.final_res_block_2(torch.cat((y, r), dim=1), t))
        return out_res, out_noise


def fold_weight_standardization(model: nn.Module) -> nn.Module:
    """Bake standardised weights into every WS conv (in place), for export and fast inference."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WeightStandardizedConv2d) and m.standardize:
                m.weight.copy_(standardized(m.weight))
                m.standardize = False
    return model


def to_export_form(model: nn.Module) -> nn.Module:
    """Fold weight standardisation and switch norms and attentions to their export form (in place).

    Same math to float rounding (~1e-6), shaped for ONNX Runtime's CPU kernels: the channel LayerNorm
    becomes one LayerNormalization, ``to_qkv`` three convs, and the linear attention's q-softmax is
    normalised after its matmul; ~10 % per call at 512² (benchmarks/NOTES.md, session 9).
    """
    fold_weight_standardization(model)
    for m in model.modules():
        if isinstance(m, (LayerNorm, _QKVAttention)):
            m.export_form = True
    return model
