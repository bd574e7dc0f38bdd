"""The Iris in-context segmentation network (Gao et al., CVPR 2025; MASS layout).

A residual UNet encoder shared by reference and target; a task-encoding module
per prior stage that turns reference features + a binary mask into (m+1) tokens
per class; a UNet decoder whose three deepest stages exchange information with
the class tokens by bidirectional attention; a dynamic head that turns token 0
of each stage into a per-class kernel over the full-resolution features.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from iris_core.errors import ConfigError
from iris_core.models.blocks import (
    Attention,
    DualPreNorm,
    PreNorm,
    ResUNetEncoder,
    TokenClassifier,
    UpBlock,
    _linear_interp_matrix,
    ffn,
)
from iris_core.models.config import IrisConfig


def pixel_shuffle_3d(x: torch.Tensor, s: int) -> torch.Tensor:
    """[B, C*s^3, D, H, W] -> [B, C, sD, sH, sW] (channel-major sub-voxel order)."""
    b, c, d, h, w = x.shape
    co = c // s**3
    return x.reshape(b, co, s, s, s, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, co, d * s, h * s, w * s)


def pixel_unshuffle_3d(x: torch.Tensor, s: int) -> torch.Tensor:
    """Inverse of :func:`pixel_shuffle_3d`."""
    b, c, d, h, w = x.shape
    return (
        x.reshape(b, c, d // s, s, h // s, s, w // s, s)
        .permute(0, 1, 3, 5, 7, 2, 4, 6)
        .reshape(b, c * s**3, d // s, h // s, w // s)
    )


def masked_mean_of_upsampled(feat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of ``trilinear_upsample(feat)`` inside each mask, computed at feature resolution.

    Upsampling is linear and separable, so <up(F), m> = <F, up^T(m)>: the masks are
    pulled back to the feature grid with the transposed interpolation matrices and
    the full-resolution feature map (C x reference voxels) is never built.
    Returns [B, K, C].
    """
    b, c, d, h, w = feat.shape
    ad, ah, aw = (
        _linear_interp_matrix(n_out, n_in).to(feat.device, torch.float32)
        for n_out, n_in in zip(masks.shape[2:], (d, h, w))
    )
    m = masks.float()
    weights = torch.einsum("bkxyz,xi,yj,zl->bkijl", m, ad, ah, aw)
    total = torch.einsum("bcijl,bkijl->bkc", feat.float(), weights)
    count = m.sum(dim=(2, 3, 4)).clamp(min=1).unsqueeze(-1)
    return (total / count).to(feat.dtype)


# radius (voxels of each level: 1/4, 1/2, full resolution) of the shell around a reference structure whose
# features make its background prototype
PROTOTYPE_SHELL = (1, 2, 3)


def _masked_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, C, D, H, W] features averaged under [B, K, D, H, W] weights -> [B, K, C]."""
    return torch.einsum("bcdhw,bkdhw->bkc", x, weights) / weights.sum((2, 3, 4)).clamp(min=1e-6)[..., None]


# The memory readout's stratified sample of reference voxels (half resolution): shares of the memory for
# voxels inside the mask and in a shell of MEMORY_NEAR voxels around it; the rest lie further away.
MEMORY_SHARES = (0.5, 0.25)
MEMORY_NEAR = 3
_EMPTY_LOG_WEIGHT = -1e4  # padding rows of a memory larger than its reference: never attended


def box_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The maximum over a (2r+1)^3 cube around each voxel of [B, C, D, H, W]: F.max_pool3d with stride 1,
    computed as one max_pool1d per axis (a box's maximum is separable; torch's 1-d pooling keeps no indices
    when nothing needs a gradient): the same numbers, 11x faster on a 128^3 window of 15 masks (issue [21])."""
    for dim in (2, 3, 4):
        moved = x.movedim(dim, -1)
        shape = moved.shape
        x = F.max_pool1d(moved.reshape(-1, 1, shape[-1]), 2 * radius + 1, 1, radius).reshape(shape).movedim(-1, dim)
    return x.contiguous()


def _memory_quotas(counts: list[int], size: int) -> list[int]:
    """How many voxels of each stratum (inside, near, far) a memory of ``size`` rows takes: the shares
    of MEMORY_SHARES (far: the rest), a short stratum's unused rows going to the others, the near shell
    first: with one sample for every class (sample_memory) it holds each class's border, and thinning it
    cost the copy test 0.010 where filling it first costs 0.0015 (issue [21])."""
    want = [int(size * MEMORY_SHARES[0]), int(size * MEMORY_SHARES[1])]
    want.append(size - sum(want))
    take = [min(c, w) for c, w in zip(counts, want)]
    spare = size - sum(take)
    for i in (1, 2, 0):
        extra = min(spare, counts[i] - take[i])
        take[i] += extra
        spare -= extra
    return take


def sample_memory(keys: torch.Tensor, masks: torch.Tensor, size: int, values: torch.Tensor | None = None,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Memory rows [B, K, size, C + V (+ 3) + 1] (key, V mask values, position in mm where ``positions``
    [B, 3, d, h, w] is given, log importance weight) from normalised keys [B, C, d, h, w] and masks
    [B, K, d, h, w] (fractions in [0, 1], on the keys' grid); the values are ``values`` [B, K, V, d, h, w]
    (the mask's sub-voxels) or the fraction itself (V = 1).

    One sample of reference voxels serves every class (issue [21]): a stratified sample, in a fixed
    pseudo-random order (the same reference always gives the same memory), of the voxels inside any
    class, in a shell of MEMORY_NEAR voxels around them and further away; each row's weight is the number
    of voxels of its stratum it stands for, so that the softmax over the sample estimates the softmax over
    every voxel for each class alike. The K classes' rows share their keys, positions and weights (only
    the values differ), so the readout attends once for all of them. Unused rows weigh nothing."""
    b, c = keys.shape[:2]
    k = masks.shape[1]
    if values is None:
        values = masks[:, :, None]
    nv = values.shape[2]
    flat_keys = keys.flatten(2).transpose(1, 2)  # [B, N, C]
    flat_v = values.flatten(3).transpose(2, 3)  # [B, K, N, V]
    flat_p = None if positions is None else positions.flatten(2).transpose(1, 2).to(keys.dtype)  # [B, N, 3]
    n = flat_keys.shape[1]
    union = masks.amax(1, keepdim=True).float()  # [B, 1, d, h, w]
    fg = union.flatten(1) > 0
    near = (box_max(union, MEMORY_NEAR).flatten(1) > 0) & ~fg
    order = torch.rand(n, generator=torch.Generator().manual_seed(0)).to(keys.device)
    npos = 0 if flat_p is None else 3
    rows = []
    for bi in range(b):
        strata = (fg[bi], near[bi], ~(fg[bi] | near[bi]))
        counts = [int(s.sum()) for s in strata]
        idx, logw = [], []
        for stratum, count, take in zip(strata, counts, _memory_quotas(counts, size)):
            if take:
                members = torch.nonzero(stratum).squeeze(1)
                idx.append(members[torch.argsort(order[members])[:take]])
                logw.append(torch.full((take,), math.log(count / take), device=keys.device))
        sel = torch.cat(idx)
        m = len(sel)
        shared = [flat_keys[bi, sel]] + ([] if flat_p is None else [flat_p[bi, sel]])
        row = keys.new_zeros(k, size, c + nv + npos + 1)
        row[:, :m, :c] = shared[0]
        row[:, :m, c : c + nv] = flat_v[bi, :, sel].to(keys.dtype)
        if npos:
            row[:, :m, c + nv : c + nv + 3] = shared[1]
        row[:, :m, -1] = torch.cat(logw).to(keys.dtype)
        row[:, m:, -1] = _EMPTY_LOG_WEIGHT
        rows.append(row)
    return torch.stack(rows)


def _flash_cpu():
    """torch's fused CPU attention that also returns each query's log-sum-exp (None where this torch lacks it)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def unit_channels(x: torch.Tensor) -> torch.Tensor:
    """F.normalize(x, dim=1) of a [B, C, ...] feature map (each voxel's channel vector to unit length, norms
    clamped at 1e-12), as a sum of squares: torch 2.13's vector norm over the channels of a channels-first map
    takes 3x as long (0.75 s of a 7 s whole-brain segmentation)."""
    norm = x.float().square().sum(1, keepdim=True).sqrt().clamp_min(1e-12)  # float: half squares overflow
    return x / norm.to(x.dtype)


def _fused_width(*widths: int) -> int:
    """The width the fused attention runs at: the widest of query and values (the kernel wants them equal), up
    to a multiple of 4: zero columns change no dot product, and torch 2.13's CPU kernel runs a 32 + 3-wide query
    (keys and positions) 10 % slower at 35 than at 36 (0.57 against 0.51 s for 32,768 queries x 16,384 rows)."""
    return -(-max(widths) // 4) * 4


def _padded_attention(op, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, logw: torch.Tensor):
    """(output [N, V], log-sum-exp [N]) of one fused attention of query [N, W] over keys [M, W] with values
    [M, V] and row weights ``logw`` [M]; the fused kernel wants equal widths, so all three are padded to the
    widest."""
    width = _fused_width(query.shape[-1], values.shape[-1])
    pad = [F.pad(t, (0, width - t.shape[-1]))[None, None].contiguous() for t in (query, keys, values)]
    out, lse = op(*pad, attn_mask=logw[None, None, None, :].contiguous(), scale=1.0)
    return out[0, 0, :, : values.shape[-1]], lse.reshape(-1)


def grouped_readout(query: torch.Tensor, keys: torch.Tensor, logw: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Softmax attention of query [N, W] over memory rows (keys [M, W], log weights [M]) reading values
    [K, M, V]: [N, K * V] (class-major), exactly what one attention with the K classes' values side by side
    computes, at about the cost of one class (issue [21]).

    The rows are split by the class whose mask they carry most (rows in no mask form one group that only
    adds to the normaliser); each group is one fused attention whose values are only the classes present in
    it (a class and, at its border, a neighbour), which returns its own log-sum-exp; the groups' outputs are
    then weighted by their share of the whole softmax. One fused attention with K * V values costs about
    K * V / W times one class (the kernel pads the query to the values' width); the groups together cost
    about one attention of width W over all rows."""
    op = _flash_cpu()
    k, m, nv = values.shape
    mass = values.sum(-1)  # [K, M]
    owner = torch.where(mass.amax(0) > 0, mass.argmax(0) + 1, 0)
    owner[logw <= _EMPTY_LOG_WEIGHT / 2] = -1  # padding rows: never attended
    outs, lses = [], []
    for g in owner.unique().tolist():
        if g < 0:
            continue
        rows = torch.nonzero(owner == g).squeeze(1)
        present = torch.nonzero((mass[:, rows] > 0).any(1)).squeeze(1)  # [P] classes carried by these rows
        vals = values[present][:, rows].permute(1, 0, 2).reshape(len(rows), -1)  # [rows, P * V]
        out, lse = _padded_attention(op, query, keys[rows], vals, logw[rows])
        cols = (present[:, None] * nv + torch.arange(nv, device=values.device)).reshape(-1)
        outs.append((out, cols))
        lses.append(lse)
    total = torch.logsumexp(torch.stack(lses), 0)  # [N]: the whole softmax's normaliser
    read = query.new_zeros(query.shape[0], k * nv)
    for (out, cols), lse in zip(outs, lses):
        if len(cols):
            read.index_add_(1, cols, out * torch.exp(lse - total)[:, None])
    return read


def split_positions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An input [B, 1, ...] (image) or [B, 4, ...] (image and each voxel's position in mm) split in two."""
    if x.shape[1] == 1:
        return x, None
    if x.shape[1] != 4:
        raise ValueError(f"an Iris input has 1 channel (image) or 4 (image, position), got {x.shape[1]}")
    return x[:, :1], x[:, 1:]


class PositionalEncoding(nn.Module):
    """Learnable positional encoding stored at a fixed edge, sliced to the input."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(1, channels, size, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sliced(x)

    def sliced(self, x: torch.Tensor) -> torch.Tensor:
        """The encoding for ``x``'s size."""
        d, h, w = x.shape[2:]
        return self.embedding[:, :, :d, :h, :w]


class TaskQueryBlock(nn.Module):
    """Query tokens: self-attend, attend to mask-conditioned features, self-attend (pre-norm, FFNs)."""

    def __init__(self, dim: int):
        super().__init__()
        heads = dim // 32
        self.query_attn_block_1 = PreNorm(dim, Attention(dim, heads))
        self.query_aggregate_block = DualPreNorm(dim, Attention(dim, heads))
        self.query_attn_block_2 = PreNorm(dim, Attention(dim, heads))
        self.query_ffn_1 = ffn(dim)
        self.query_aggregate_ffn = ffn(dim)
        self.query_ffn_2 = ffn(dim)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.query_attn_block_1(tokens) + tokens
        tokens = self.query_ffn_1(tokens) + tokens
        tokens = self.query_aggregate_block(tokens, feats) + tokens
        tokens = self.query_aggregate_ffn(tokens) + tokens
        tokens = self.query_attn_block_2(tokens) + tokens
        return self.query_ffn_2(tokens) + tokens


def _norm_act_conv(in_ch: int, out_ch: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.InstanceNorm3d(in_ch),
        nn.ReLU(),
        nn.Conv3d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
    )


class TaskEncoder(nn.Module):
    """One prior stage of task encoding: reference features + K masks -> [B, K, m+1, C] tokens.

    Foreground path: the reference features averaged inside each mask (one token).
    Context path: features expanded and pixel-shuffled to mask resolution, merged
    with the mask, position-encoded, unshuffled and squeezed back (plus residual);
    m learnable query tokens and the foreground token attend to it.
    """

    def __init__(self, dim: int, scale: int, cfg: IrisConfig):
        super().__init__()
        if scale % cfg.context_downsample:
            raise ConfigError(f"context_downsample {cfg.context_downsample} does not divide scale {scale}")
        self.downsample = cfg.context_downsample
        self.scale = scale // cfg.context_downsample
        sub = self.scale**3
        self.task_query = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(cfg.query_tokens, dim)))
        self.attn_layers = nn.ModuleList([TaskQueryBlock(dim) for _ in range(cfg.attn_blocks)])
        self.norm_foreground = nn.LayerNorm(dim)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_combined = nn.LayerNorm(dim)
        self.norm_post = nn.LayerNorm(dim)
        self.expand = _norm_act_conv(dim, sub, 1)
        self.merge = _norm_act_conv(2, 1, 3)
        self.squeeze = _norm_act_conv(sub, dim, 1)
        self.pos_embed = PositionalEncoding(1, cfg.pos_embed_size)

    fast_foreground = True  # False: upsample features to the mask grid (the reference formulation)

    def forward(self, feat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        b, c = feat.shape[:2]
        k = masks.shape[1]
        if self.fast_foreground:
            fg = masked_mean_of_upsampled(feat, masks)  # [B, K, C]
        else:
            up = F.interpolate(feat, size=masks.shape[-3:], mode="trilinear", align_corners=True)
            fg = _masked_mean(up, masks.to(up.dtype))

        ctx_masks = masks.float()
        if self.downsample > 1:
            ctx_masks = F.avg_pool3d(ctx_masks, self.downsample)
        ctx = pixel_shuffle_3d(self.expand(feat), self.scale)  # [B, 1, D', H', W']
        ctx = ctx.unsqueeze(1).expand(-1, k, -1, -1, -1, -1).reshape(b * k, 1, *ctx.shape[2:])
        merged = torch.cat([ctx, ctx_masks.reshape(b * k, 1, *ctx_masks.shape[2:]).to(ctx.dtype)], dim=1)
        # unshuffle(merge + pos) written as unshuffle(merge) + unshuffle(pos) (the same numbers): a
        # convolution followed directly by the add of a weight is fused by inductor's frozen CPU code
        # into an in-place add that overwrites the weight, so a compiled encoder drifted after its
        # first call
        merged = (pixel_unshuffle_3d(self.merge(merged), self.scale)
                  + pixel_unshuffle_3d(self.pos_embed.sliced(merged), self.scale))
        residual = feat.unsqueeze(1).expand(-1, k, -1, -1, -1, -1).reshape(b * k, *feat.shape[1:])
        merged = self.squeeze(merged) + residual
        merged = merged.flatten(2).transpose(1, 2)  # [B*K, N, C]

        query = self.norm_query(self.task_query).unsqueeze(0).expand(b * k, -1, -1)
        fg = self.norm_foreground(fg.reshape(b * k, 1, c))
        tokens = self.norm_combined(torch.cat([query, fg], dim=1))
        for layer in self.attn_layers:
            tokens = layer(merged, tokens)
        return self.norm_post(tokens).view(b, k, -1, c)


class PriorFusionBlock(nn.Module):
    """Bidirectional attention between target features and all class tokens, then token self-attention."""

    def __init__(self, dim: int):
        super().__init__()
        heads = dim // 32
        self.prior_aggregate_block = DualPreNorm(dim, Attention(dim, heads))
        self.feat_aggregate_block = DualPreNorm(dim, Attention(dim, heads))
        self.prior_attn_block = PreNorm(dim, Attention(dim, heads))
        self.prior_ffn = ffn(dim)
        self.feat_ffn = ffn(dim)
        self.prior_ffn_2 = ffn(dim)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.prior_aggregate_block(tokens, feats) + tokens
        tokens = self.prior_ffn(tokens) + tokens
        feats = self.feat_aggregate_block(feats, tokens) + feats
        feats = self.feat_ffn(feats) + feats
        tokens = self.prior_attn_block(tokens) + tokens
        tokens = self.prior_ffn_2(tokens) + tokens
        return feats, tokens


class PriorFusion(nn.Module):
    """A stack of fusion blocks applied to a feature map and [B, K, T, C] class tokens."""

    def __init__(self, dim: int, blocks: int):
        super().__init__()
        self.attn_layers = nn.ModuleList([PriorFusionBlock(dim) for _ in range(blocks)])

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, d, h, w = x.shape
        _, k, t, _ = tokens.shape
        feats = x.flatten(2).transpose(1, 2)
        flat = tokens.reshape(b, k * t, c)
        for layer in self.attn_layers:
            feats, flat = layer(feats, flat)
        return feats.transpose(1, 2).reshape(b, c, d, h, w), flat.view(b, k, t, c)


class IrisDecoder(nn.Module):
    """UNet decoder; before the three deepest up-steps, features and class tokens exchange information."""

    def __init__(self, cfg: IrisConfig):
        super().__init__()
        ch, nb = cfg.channels, cfg.num_block
        self.prior_fuse = nn.ModuleList(PriorFusion(d, cfg.attn_blocks) for d in cfg.token_dims)
        self.head_index = 0 if cfg.head_token == "query" else -1
        self.levels: list[torch.Tensor] = []  # outputs of the last up-steps (prototype levels), per call
        self.up1 = UpBlock(ch[4], ch[3], nb[3])
        self.up2 = UpBlock(ch[3], ch[2], nb[2])
        self.up3 = UpBlock(ch[2], ch[1], nb[1])
        self.up4 = UpBlock(ch[1], ch[0], nb[0])

    def forward(
        self, feats: Sequence[torch.Tensor], tokens: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x5, x4, x3, x2, x1 = feats
        posterior: list[torch.Tensor] = []
        out = x5
        levels = []
        for stage, (up, skip) in enumerate(((self.up1, x4), (self.up2, x3), (self.up3, x2), (self.up4, x1))):
            if stage < len(self.prior_fuse):
                out, post = self.prior_fuse[stage](out, tokens[stage].to(out.dtype))
                posterior.append(post[:, :, self.head_index, :])  # the token that summarises the class
            out = up(out, skip)
            if stage >= 1:
                levels.append(out)
        self.levels = levels  # 1/4, 1/2 and full resolution: read by the reference prototype
        return out, posterior


class IrisNet(nn.Module):
    """Iris: ``encode_task`` once per reference, ``segment`` any number of targets, K classes per pass."""

    arch = "iris"

    def __init__(self, cfg: IrisConfig | None = None):
        super().__init__()
        cfg = cfg or IrisConfig()
        self.config = cfg
        self.encoder = ResUNetEncoder(cfg.in_ch, cfg.channels, cfg.num_block)
        self.decoder = IrisDecoder(cfg)
        self.task_embedding = nn.ModuleList(
            TaskEncoder(dim, 2 ** (4 - i), cfg) for i, dim in enumerate(cfg.token_dims)
        )
        # Memory bank: one EMA embedding per known class slot (usable with no reference).
        for i, dim in enumerate(cfg.token_dims):
            self.register_buffer(
                f"task_prior_{i}", nn.init.xavier_uniform_(torch.zeros(cfg.task_prior_slots, cfg.query_tokens + 1, dim))
            )
        self.out = TokenClassifier(sum(cfg.token_dims), cfg.channels[0])
        if cfg.reference_prototype:  # logit += scale * (cosine(target features, prototype) - shift)
            # with a memory readout the prototype starts as a small correction of the readout
            self.prototype_scale = nn.Parameter(torch.tensor(2.0 if cfg.memory_tokens else 10.0))
            self.prototype_shift = nn.Parameter(torch.tensor(0.0))  # a voxel closer to the foreground is foreground
        if cfg.memory_tokens:  # logit += scale * (mask read out of the matching reference voxels - 0.5)
            self.memory_key = nn.Conv3d(sum(cfg.channels[1:]), cfg.memory_dim, 1, bias=False)
            # orthogonal rows: the projection roughly keeps the cosines of the untrained features, which
            # already match a voxel to its counterpart (the readout works from the first step)
            nn.init.orthogonal_(self.memory_key.weight.view(cfg.memory_dim, -1))
            self.memory_temperature = nn.Parameter(torch.tensor(math.log(50.0)))  # log of the softmax inverse temperature
            self.memory_scale = nn.Parameter(torch.tensor(20.0))
            if cfg.memory_positions:  # log of the distance scale (mm) of the position term
                self.memory_log_sigma = nn.Parameter(torch.tensor(math.log(cfg.position_sigma_mm)))

    def encode_task(self, reference: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
        """Task embedding of K binary masks on one reference: a list, deepest stage first, of
        [B, K, m+1, C_s] token tensors. ``reference`` is [B, 1, D, H, W], ``masks`` [B, K, D, H, W]; a
        model with ``memory_positions`` also takes [B, 4, D, H, W]: the image and each voxel's position
        (mm), which its memory rows keep."""
        image, positions = split_positions(reference)
        feats = self.encoder(image)
        return self.encode_task_from_features(feats, masks, positions)

    def encode_task_from_features(self, feats: Sequence[torch.Tensor], masks: torch.Tensor,
                                  positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """As :meth:`encode_task`, from encoder features already computed. With ``reference_prototype``
        the list has one more entry, [B, K, 2, C_2 + C_1 + C_0]: the reference's decoder features at its
        last three levels (decoded with its own task tokens), averaged inside each mask (foreground) and
        in a thin shell around it (background)."""
        tokens = [enc(f, masks) for enc, f in zip(self.task_embedding, feats)]
        if self.config.reference_prototype:
            self.decoder(feats, tokens)
            protos = []
            for radius, level in zip(PROTOTYPE_SHELL, self.decoder.levels):
                m = F.adaptive_avg_pool3d(masks.to(level.dtype), level.shape[2:])
                # the background prototype is local: a shell around the structure, not the whole crop, so
                # that the structure is told apart from the tissue next to it (not from air)
                shell = (box_max(m, radius) - m).clamp(min=0)
                protos.append(torch.stack([_masked_mean(level, m), _masked_mean(level, shell)], dim=2))
            tokens.append(torch.cat(protos, dim=-1))
        if self.config.memory_tokens:
            keys = self.memory_keys(feats)
            m = F.adaptive_avg_pool3d(masks.to(keys.dtype), keys.shape[2:])
            values = None
            if self.config.memory_subvoxels:  # the mask's 2x2x2 sub-voxels of each half-resolution voxel
                b, k = masks.shape[:2]
                values = pixel_unshuffle_3d(masks.to(keys.dtype), 2).view(b, k, 8, *keys.shape[2:])
            pos = None
            if self.config.memory_positions:  # unknown positions are NaN: the readout then ignores them
                pos = (F.avg_pool3d(positions.float(), 2) if positions is not None else
                       keys.new_full((keys.shape[0], 3, *keys.shape[2:]), float("nan")))
            tokens.append(sample_memory(keys, m, self.config.memory_tokens, values, pos))
        return tokens

    def memory_keys(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Normalised keys [B, memory_dim, D/2, H/2, W/2]: the encoder's features of the four coarser
        stages, each normalised, brought to half resolution, concatenated and projected."""
        size = feats[3].shape[2:]
        parts = [unit_channels(f if f.shape[2:] == size else
                               F.interpolate(f, size=size, mode="trilinear", align_corners=False))
                 for f in feats[:4]]
        return unit_channels(self.memory_key(torch.cat(parts, 1)))

    @property
    def memory_values(self) -> int:
        """Mask values per memory row: the 8 sub-voxels (``memory_subvoxels``) or the fraction."""
        return 8 if self.config.memory_subvoxels else 1

    def memory_readout(self, feats: Sequence[torch.Tensor], memory: torch.Tensor,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
        """Each class's mask read out at every target voxel (in [0, 1]): softmax attention of the voxel's
        key over the memory rows [B, K, M, C + V (+ 3) + 1], which the K classes of a call share (one reference
        crop: keys, positions and weights; only the mask values differ), so that one attention reads every
        class (issue [21]: the cost hardly grows with the class count). With target
        ``positions`` [B, 3, d, h, w] (mm, half resolution) and memory positions mapped into the target's
        space (an aligned reference), the logits add -|x - y|^2 / (2 sigma^2): a reference voxel counts
        for a target voxel by its features and by how near it lies after alignment (non-local label
        fusion). [B, K, D, H, W] on the model grid: the fraction read at half resolution and upsampled, or
        the 8 sub-voxels read there and put in place."""
        q = self.memory_keys(feats)
        b, c = q.shape[:2]
        size = q.shape[2:]
        memory = memory.to(q.dtype)
        if memory.shape[0] != b:
            memory = memory.expand(b, -1, -1, -1)
        k = memory.shape[1]
        nv = self.memory_values
        npos = 3 if self.config.memory_positions else 0
        # contiguous channels last: a transposed query also sends the attention down the unfused path
        query = q.flatten(2).transpose(1, 2).contiguous() * self.memory_temperature.exp()  # [B, N, C]
        qpos = None
        if npos and positions is not None:  # the memory's positions must be the target's (aligned): the engine
            qpos = positions.to(q.dtype).flatten(2).transpose(1, 2)  # [B, N, 3]  passes positions only then
        # every class of a call shares its memory rows (keys, positions, weights: one reference crop, see
        # sample_memory; the engine makes a call per group of classes that share them): one attention
        # whose values carry every class's mask values
        head = memory[:, 0]
        keys, logw = head[..., :c], head[..., -1]
        if qpos is not None:
            query, keys, logw = self._position_terms(query, qpos, keys, head[..., c + nv : c + nv + 3], logw)
        if k > 1 and query.device.type == "cpu" and not torch.is_grad_enabled() and _flash_cpu() is not None:
            # inference on the CPU: one fused attention per group of rows (grouped_readout), the same numbers
            values = memory[..., c : c + nv]
            read = torch.stack([grouped_readout(query[i], keys[i], logw[i], values[i]) for i in range(b)])
        else:
            vals = memory[..., c : c + nv].permute(0, 2, 1, 3).reshape(b, -1, k * nv)
            width = _fused_width(query.shape[-1], vals.shape[-1])  # torch's fused kernels: equal widths
            query, keys = F.pad(query, (0, width - query.shape[-1])), F.pad(keys, (0, width - keys.shape[-1]))
            vals = F.pad(vals, (0, width - vals.shape[-1]))
            read = F.scaled_dot_product_attention(query[:, None], keys.contiguous()[:, None], vals[:, None],
                                                  attn_mask=logw[:, None, None, :].contiguous(), scale=1.0)[:, 0]
        out = read[..., : k * nv].reshape(b, -1, k, nv).permute(0, 2, 1, 3)  # [B, K, N, V]
        full = tuple(2 * s for s in size)  # the model grid (the keys are at half its resolution)
        if nv == 8:
            sub = out.transpose(2, 3).reshape(b, k * 8, *size)
            return pixel_shuffle_3d(sub, 2).view(b, k, *full)
        return F.interpolate(out[..., 0].reshape(b, k, *size), size=full, mode="trilinear", align_corners=False)

    def _position_terms(self, query: torch.Tensor, qpos: torch.Tensor, keys: torch.Tensor, kpos: torch.Tensor,
                        logw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-|x - y|^2 / (2 sigma^2) folded into the attention: x.y / sigma^2 as three more key dimensions,
        -|y|^2 / (2 sigma^2) into the row weights (-|x|^2 / (2 sigma^2) is the same for every row of a
        query: the softmax drops it). Positions centred on the window first (small numbers). A batch item
        whose memory positions are unknown (NaN: an unaligned reference) gets no position term."""
        known = torch.isfinite(kpos).flatten(1).all(1)[:, None, None]  # [B, 1, 1]
        centre = qpos.mean(1, keepdim=True)
        inv = torch.exp(-self.memory_log_sigma)
        # unknown positions replaced before any arithmetic: NaN times the zero gradient of a discarded
        # branch would still be NaN in the backward pass
        kpos = torch.where(known, kpos, centre)
        qp = torch.where(known, (qpos - centre) * inv, 0.0)
        kp = (kpos - centre) * inv
        return (torch.cat([query, qp], -1), torch.cat([keys, kp], -1), logw - 0.5 * (kp * kp).sum(-1))

    def segment(self, target: torch.Tensor, embedding: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits [B, K, D, H, W] of the K classes of ``embedding`` on ``target`` [B, 1, D, H, W].
        An embedding with batch 1 is shared by every target in the batch."""
        image, positions = split_positions(target)
        return self.segment_from_features(self.encoder(image), embedding, positions)

    def segment_from_features(self, feats: Sequence[torch.Tensor], embedding: Sequence[torch.Tensor],
                              positions: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`segment`, from target encoder features already computed (batch 1 features are
        shared by every embedding in a batch: one encoder pass for several single-class decodes);
        ``positions`` [B, 3, D, H, W]: the target voxels' positions (mm), for a position-aware readout."""
        b = max(feats[0].shape[0], embedding[0].shape[0])
        feats = [f.expand(b, *f.shape[1:]) if f.shape[0] == 1 else f for f in feats]
        tokens = [e.expand(b, -1, -1, -1) if e.shape[0] == 1 else e for e in embedding]
        n = self.config.num_prior_stage
        out, posterior = self.decoder(feats, tokens[:n])
        logits = self.out(out, posterior) if self.config.head_token != "prototype" else 0
        if self.config.reference_prototype:
            logits = logits + self.prototype_scale * (self.prototype_similarity(tokens[n]) - self.prototype_shift)
        if self.config.memory_tokens:
            half = None if positions is None else F.avg_pool3d(positions.float(), 2)
            kind = feats[0].device.type  # autocast has no 'meta' device (the FLOP counter's copy of the network)
            with torch.autocast(kind, enabled=False) if kind != "meta" else contextlib.nullcontext():
                read = self.memory_readout([f.float() for f in feats], tokens[-1].float(), half)
            logits = logits + self.memory_scale * (read - 0.5)
        return logits

    def prototype_similarity(self, proto: torch.Tensor) -> torch.Tensor:
        """Mean over the decoder's last three levels of cosine(voxel, foreground prototype) minus
        cosine(voxel, background prototype); ``proto`` is [B, K, 2, sum C] (computed at each level's
        resolution, upsampled to full resolution)."""
        levels = self.decoder.levels
        full = levels[-1].shape[2:]
        total = 0
        start = 0
        for level in levels:
            c = level.shape[1]
            p = F.normalize(proto[..., start : start + c].to(level.dtype), dim=-1)
            start += c
            f = unit_channels(level)
            cos = torch.einsum("bcdhw,bkc->bkdhw", f, p[:, :, 0] - p[:, :, 1])  # cos(f, fg) - cos(f, bg): one product
            if cos.shape[2:] != full:
                cos = F.interpolate(cos, size=full, mode="trilinear", align_corners=False)
            total = total + cos
        return total / len(levels)

    def forward(self, target: torch.Tensor, reference: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.segment(target, self.encode_task(reference, masks))
