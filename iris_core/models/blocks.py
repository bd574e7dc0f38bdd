"""Building blocks shared by the Iris and Hermes networks.

Module and attribute names follow the published checkpoints' state_dict layout
(MASS ``mass_base.pth`` and Hermes-R), so those files load without a key map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# Epsilons of the reference networks: conv-block instance norms and PreNorm layer
# norms use 1e-4, DualPreNorm layer norms and the task-encoding instance norms the
# PyTorch default 1e-5. They matter for reproducing published logits.
CONV_NORM_EPS = 1e-4
PRENORM_EPS = 1e-4


def _linear_interp_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """Matrix A [n_out, n_in] (float64) of 1-D linear interpolation with ``align_corners=True``."""
    return torch.from_numpy(_numpy_cached(_interp_matrix_np, n_out, n_in))


def _interp_taps(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output of that interpolation: the two inputs it lies between and the second's weight."""
    return tuple(torch.from_numpy(a) for a in _numpy_cached(_interp_taps_np, n_out, n_in))


def _numpy_cached(build, *args):
    # numpy arrays are cached, and become tensors at each call: a cached tensor made under inference mode
    # cannot be saved for backward in a later training step, and one made while torch.compile traces
    # would be a fake tensor. Under torch.export the arrays are constants, not a chain of in-place index
    # writes on a fresh buffer inside the compiled graph (those read stale memory in AOTInductor's frozen
    # CPU code: the embedding changed from call to call).
    if torch.compiler.is_compiling():
        return build.__wrapped__(*args)
    return build(*args)


@lru_cache(maxsize=64)
def _interp_taps_np(n_out: int, n_in: int):
    import numpy as np

    if n_in == 1 or n_out == 1:
        return np.zeros(n_out, dtype=np.int64), np.zeros(n_out, dtype=np.int64), np.zeros(n_out)
    pos = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo


@lru_cache(maxsize=64)
def _interp_matrix_np(n_out: int, n_in: int):
    import numpy as np

    lo, hi, frac = _interp_taps_np.__wrapped__(n_out, n_in)
    a = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    a[rows, lo] += 1 - frac
    a[rows, hi] += frac
    return a


def _lerp_rows(x: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
    """Linear interpolation (``align_corners=True``) of ``x`` along ``dim`` to ``n_out``, by gathering
    whole slices: along an outer axis each gather is a contiguous row, so the compiled loop vectorises."""
    lo, hi, frac = _interp_taps(n_out, x.shape[dim])
    shape = [1] * x.dim()
    shape[dim] = n_out
    a = x.index_select(dim, lo.to(x.device))
    b = x.index_select(dim, hi.to(x.device))
    return a + (b - a) * frac.to(x.device, x.dtype).view(shape)


def upsample_trilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="trilinear", align_corners=True)`` for [B, C, D, H, W], computed
    separably: a matrix product along W (the contiguous axis), then slice gathers along H and D.

    Same values up to float rounding. Why: inductor lowers ``F.interpolate`` to eight scalar gathers per
    output voxel with their index arithmetic, a pass that took 1.9 s of a MASS-base window (128^3, 2-core
    CPU) - longer than writing the result ten times over; this form compiles to a GEMM and one vectorised
    pass."""
    d, h, w = (int(n) for n in size)
    y = x @ _linear_interp_matrix(w, x.shape[4]).to(x.device, x.dtype).T
    return _lerp_rows(_lerp_rows(y, 3, h), 2, d)


def normalise_for_upsampling(x: torch.Tensor, size: Sequence[int], eps: float) -> torch.Tensor:
    """``x`` shifted and scaled per channel so that ``upsample_trilinear(result, size)`` equals
    ``instance_norm(upsample_trilinear(x, size), eps)``, computed at ``x``'s resolution.

    Each output of a linear interpolation is a convex combination of inputs (weights sum to 1), so
    interpolation commutes with a per-channel shift and scale. The statistics of the upsampled map are
    those of x weighted by the interpolation: mean = <x, s_d (x) s_h (x) s_w> / N with s the matrices'
    column sums; sum of squares of the centred map = <xc, (G_d (x) G_h (x) G_w) xc> with G = A^T A
    (small, applied along each axis). The upsampled map's own statistics are never formed."""
    mats = [_linear_interp_matrix(int(o), int(i)).to(x.device, x.dtype) for o, i in zip(size, x.shape[2:])]
    n_out = float(size[0]) * float(size[1]) * float(size[2])
    s_d, s_h, s_w = (a.sum(0) for a in mats)
    mean = torch.einsum("bcdhw,d,h,w->bc", x, s_d, s_h, s_w) / n_out
    xc = x - mean[:, :, None, None, None]
    g_d, g_h, g_w = (a.T @ a for a in mats)
    gx = torch.einsum("bcdhw,dD,hH,wW->bcDHW", xc, g_d, g_h, g_w)
    var = (xc * gx).sum((2, 3, 4)) / n_out
    return xc * torch.rsqrt(var + eps)[:, :, None, None, None]


class ConvNormAct(nn.Module):
    """Pre-activation convolution: instance norm -> ReLU -> conv (no bias)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.norm = nn.InstanceNorm3d(in_ch, eps=CONV_NORM_EPS)
        self.act = nn.ReLU()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class BasicBlock(nn.Module):
    """Residual block of two pre-activation 3x3x3 convolutions; a conv shortcut when channels change."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_ch, out_ch)
        self.conv2 = ConvNormAct(out_ch, out_ch)
        self.shortcut = ConvNormAct(in_ch, out_ch) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + self.shortcut(x)

    def forward_activated(self, a: torch.Tensor) -> torch.Tensor:
        """The block on ``a`` = relu(instance_norm(x)) already computed: conv1 and a changing shortcut
        both begin with that same parameter-free norm and ReLU of x."""
        if not isinstance(self.shortcut, ConvNormAct):
            raise ValueError("forward_activated needs a block whose channels change (its input is not kept)")
        return self.conv2(self.conv1.conv(a)) + self.shortcut.conv(a)


class InConv(nn.Module):
    """Stem: a plain 3x3x3 convolution followed by one residual block."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False)
        self.conv2 = BasicBlock(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class DownBlock(nn.Module):
    """Max-pool by 2, then ``num_block`` residual blocks."""

    checkpointing = False  # recompute activations in backward (training memory)

    def __init__(self, in_ch: int, out_ch: int, num_block: int):
        super().__init__()
        blocks: list[nn.Module] = [nn.MaxPool3d(2), BasicBlock(in_ch, out_ch)]
        blocks += [BasicBlock(out_ch, out_ch) for _ in range(num_block - 1)]
        self.conv = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.conv, x, use_reentrant=False)
        return self.conv(x)


class UpBlock(nn.Module):
    """Trilinear upsampling to the skip's size, concatenation [skip, up], residual blocks."""

    checkpointing = False

    def __init__(self, in_ch: int, out_ch: int, num_block: int):
        super().__init__()
        blocks = [BasicBlock(in_ch + out_ch, out_ch)]
        blocks += [BasicBlock(out_ch, out_ch) for _ in range(num_block - 1)]
        self.conv = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # = self.conv(cat([skip, trilinear_upsample(x)])) (align_corners=True), computed so that the
        # upsampled half is normalised before it is formed: the first block's conv1 and shortcut open with
        # the same parameter-free instance norm + ReLU of the concatenation, which is per channel, so
        # each half is normalised on its own; the upsampled half at x's resolution
        # (normalise_for_upsampling), then interpolated and rectified in one pass. Upsampling runs in
        # float32 (as the published F.interpolate did: it lacks bfloat16 kernels on some builds).
        first = self.conv[0]
        eps = first.conv1.norm.eps
        size = skip.shape[2:]
        # float32 whatever autocast says: its matmuls would otherwise round the statistics to bf16/fp16,
        # where instance norm itself is on autocast's float32 list
        # (only where autocast exists: the meta device, on which the benchmark counts FLOPs, has none)
        with (torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type)
              else contextlib.nullcontext()):
            up = F.relu(upsample_trilinear(normalise_for_upsampling(x.float(), size, eps), size)).to(skip.dtype)
        a = torch.cat([F.relu(F.instance_norm(skip, eps=eps)), up], dim=1)
        y = first.forward_activated(a)
        for block in self.conv[1:]:
            y = block(y)
        return y


class ResUNetEncoder(nn.Module):
    """Residual 3D UNet encoder: a stem and four max-pool stages; returns features deepest first."""

    def __init__(self, in_ch: int, channels: Sequence[int], num_block: Sequence[int]):
        super().__init__()
        ch = list(channels)
        self.inc = InConv(in_ch, ch[0])
        self.down1 = DownBlock(ch[0], ch[1], num_block[0])
        self.down2 = DownBlock(ch[1], ch[2], num_block[1])
        self.down3 = DownBlock(ch[2], ch[3], num_block[2])
        self.down4 = DownBlock(ch[3], ch[4], num_block[3])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        return x5, x4, x3, x2, x1


class Mlp(nn.Module):
    """Two linear layers with an exact GELU between them."""

    def __init__(self, in_dim: int, hid_dim: int | None = None, out_dim: int | None = None):
        super().__init__()
        hid_dim = hid_dim or in_dim
        out_dim = out_dim or in_dim
        self.fc1 = nn.Linear(in_dim, hid_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hid_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v: PyTorch's fused kernel, or the plain eager formula (reference path)."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v)
    w = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    return w @ v


class PackedProjection(nn.Module):
    """Multi-head attention with packed q/k/v input projections (``in_proj_weight`` layout)."""

    fused = True  # False: the plain eager reference formula (benchmarks compare the two)

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        w_q, w_kv = self.in_proj_weight.split([query.shape[-1], 2 * query.shape[-1]])
        b_q, b_kv = self.in_proj_bias.split([query.shape[-1], 2 * query.shape[-1]])
        q = F.linear(query, w_q, b_q)
        k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        return self.out_proj(_merge_heads(attention(q, k, v, self.fused)))


class Attention(nn.Module):
    """Cross- or self-attention (Iris); heads of 32 channels."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mha = PackedProjection(dim, heads)

    def forward(self, query: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.mha(query, query if context is None else context)


class QKVCrossAttention(nn.Module):
    """Cross-attention with separate bias-free q and kv projections (Hermes layout)."""

    fused = True

    def __init__(self, dim: int, heads: int, dim_head: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.to_q(query), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        return self.to_out(_merge_heads(attention(q, k, v, self.fused)))


class PreNorm(nn.Module):
    """Layer norm of the input, then ``fn``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=PRENORM_EPS)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class DualPreNorm(nn.Module):
    """Separate layer norms of query and context, then ``fn(query, context)``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm1(x1), self.norm2(x2))


def ffn(dim: int, expansion: int = 4) -> PreNorm:
    """Pre-norm feed-forward block with a 4x hidden layer."""
    return PreNorm(dim, Mlp(dim, dim * expansion, dim))


class TokenClassifier(nn.Module):
    """Dynamic head: concatenated per-class tokens -> layer norm -> 2 MLPs -> a kernel per class,
    dotted with the full-resolution features to give one logit map per class."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.classifier_pred = nn.Sequential(Mlp(in_dim, out_dim=out_dim), Mlp(out_dim, out_dim=out_dim))
        for m in self.classifier_pred.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def kernels(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-class kernels [B, K, out_dim] from per-stage tokens [B, K, C_s]."""
        return self.classifier_pred(self.norm(torch.cat(list(tokens), dim=-1)))

    def forward(self, x: torch.Tensor, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        w = self.kernels(tokens).to(x.dtype)
        return torch.einsum("bcdhw,bkc->bkdhw", x, w)
