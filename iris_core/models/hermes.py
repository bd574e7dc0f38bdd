"""The Hermes ResUNet with context-prior fusion (Gao et al., CVPR 2024; Hermes-R layout).

Each fusion layer owns learnable task priors (one token per task, plus a null
slot) and modality priors (several tokens per modality). For a sample, the named
tasks' tokens and its modality's tokens attend to the features and the features
attend back. Posterior task tokens of five stages become per-task kernels dotted
with the final features; posterior modality tokens classify the modality.
"""

from __future__ import annotations

import torch
from torch import nn

from iris_core.models.blocks import (
    DualPreNorm,
    Mlp,
    QKVCrossAttention,
    ResUNetEncoder,
    TokenClassifier,
    UpBlock,
    ffn,
)
from iris_core.models.config import HermesConfig


class HermesAttentionBlock(nn.Module):
    """Priors aggregate from features, then features aggregate from priors (pre-norm, FFNs)."""

    def __init__(self, dim: int):
        super().__init__()
        heads = dim // 32
        self.prior_aggregate_block = DualPreNorm(dim, QKVCrossAttention(dim, heads))
        self.prior_ffn = ffn(dim)
        self.feat_aggregate_block = DualPreNorm(dim, QKVCrossAttention(dim, heads))
        self.feat_ffn = ffn(dim)

    def forward(self, feats: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        priors = self.prior_aggregate_block(priors, feats) + priors
        priors = self.prior_ffn(priors) + priors
        feats = self.feat_aggregate_block(feats, priors) + feats
        feats = self.feat_ffn(feats) + feats
        return feats, priors


class PriorFusionLayer(nn.Module):
    """Selects the sample's task and modality priors and fuses them with a feature map."""

    def __init__(self, dim: int, blocks: int, cfg: HermesConfig):
        super().__init__()
        self.task_prior = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(cfg.task_prior_slots + 1, dim)))
        self.modality_prior = nn.Parameter(
            nn.init.xavier_uniform_(torch.zeros(cfg.modality_prior_slots, cfg.modality_tokens, dim))
        )
        self.attn_layers = nn.ModuleList(HermesAttentionBlock(dim) for _ in range(blocks))

    def forward(
        self, x: torch.Tensor, task_idx: torch.Tensor, modality_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, d, h, w = x.shape
        priors = torch.cat([self.task_prior[task_idx], self.modality_prior[modality_idx[:, 0]]], dim=1)
        feats = x.flatten(2).transpose(1, 2)
        priors = priors.to(feats.dtype)
        for layer in self.attn_layers:
            feats, priors = layer(feats, priors)
        return feats.transpose(1, 2).reshape(b, c, d, h, w), priors


class ModalityClassifier(nn.Module):
    """Layer norm of the concatenated modality tokens, mean over tokens, MLP -> modality logits."""

    def __init__(self, in_dim: int, n_modalities: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.classifier = Mlp(in_dim, out_dim=n_modalities)

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.norm(torch.cat(tokens, dim=2)).mean(dim=1))


class HermesNet(nn.Module):
    """Hermes: segment named tasks (global task indices) of a given modality, no reference needed."""

    arch = "hermes"

    def __init__(self, cfg: HermesConfig | None = None):
        super().__init__()
        cfg = cfg or HermesConfig()
        self.config = cfg
        ch, nb = cfg.channels, cfg.num_block
        encoder = ResUNetEncoder(cfg.in_ch, ch, nb)
        # Flat attribute names, as in the published Hermes-R state_dict.
        self.inc, self.down1, self.down2 = encoder.inc, encoder.down1, encoder.down2
        self.down3, self.down4 = encoder.down3, encoder.down4
        self.prior_init_fuse_2 = PriorFusionLayer(ch[2], 2, cfg)
        self.prior_init_fuse_3 = PriorFusionLayer(ch[3], 2, cfg)
        self.prior_init_fuse_4 = PriorFusionLayer(ch[4], cfg.deep_blocks, cfg)
        self.up1 = UpBlock(ch[4], ch[3], nb[2])
        self.prior_fuse_5 = PriorFusionLayer(ch[3], 2, cfg)
        self.up2 = UpBlock(ch[3], ch[2], nb[1])
        self.prior_fuse_6 = PriorFusionLayer(ch[2], 2, cfg)
        self.up3 = UpBlock(ch[2], ch[1], nb[0])
        self.up4 = UpBlock(ch[1], ch[0], 2)
        token_dim = ch[2] + ch[3] + ch[4] + ch[3] + ch[2]
        self.out = TokenClassifier(token_dim, ch[0])
        self.mod_out = ModalityClassifier(token_dim, cfg.modality_prior_slots)

    def forward(
        self, x: torch.Tensor, task_idx: torch.Tensor, modality_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task logits [B, T, D, H, W] and modality logits [B, M] for ``task_idx`` [B, T]
        and ``modality_idx`` [B, 1]."""
        n_task = task_idx.shape[1]
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3, p2 = self.prior_init_fuse_2(self.down2(x2), task_idx, modality_idx)
        x4, p3 = self.prior_init_fuse_3(self.down3(x3), task_idx, modality_idx)
        x5, p4 = self.prior_init_fuse_4(self.down4(x4), task_idx, modality_idx)
        out, p5 = self.prior_fuse_5(self.up1(x5, x4), task_idx, modality_idx)
        out, p6 = self.prior_fuse_6(self.up2(out, x3), task_idx, modality_idx)
        out = self.up4(self.up3(out, x2), x1)
        priors = [p2, p3, p4, p5, p6]
        logits = self.out(out, [p[:, :n_task] for p in priors])
        return logits, self.mod_out([p[:, n_task:] for p in priors])
