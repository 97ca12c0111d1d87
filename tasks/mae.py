"""Masked-autoencoder pretraining on lensing images (DeepLense Test VI).

    python -m platform.tune task=mae
    python -m platform.train task=mae model.mask_ratio=0.6 train.epochs=20

Masked autoencoder (He et al., 2021, "Masked Autoencoders Are Scalable Vision Learners").

An asymmetric encoder-decoder ViT: the encoder sees only the visible subset of patches
(no mask tokens), and a light decoder reconstructs the pixels of every patch from the
encoded visible patches plus shared mask tokens. The loss is taken on masked patches only.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from platform import data
from platform.config import ConfigError, bounded
from platform.data.augment import AugmentConfig, batch_images
from platform.plots import image_rows_figure
from platform.registry import Task, register
from tasks._shared import resized


@dataclass
class MAEModelConfig:
    img_size: int = bounded(64, 8)  # images are resized to this if the data differ
    patch_size: int = bounded(8, 1)
    embed_dim: int = bounded(128, 4)
    depth: int = bounded(4, 1)
    num_heads: int = bounded(4, 1)
    decoder_dim: int = bounded(64, 4)
    decoder_depth: int = bounded(2, 1)
    decoder_heads: int = bounded(4, 1)
    mask_ratio: float = bounded(0.75, 0.0, 1.0, high_open=True)
    norm_pix_loss: bool = False

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ConfigError(f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}")
        for dim, heads, name in ((self.embed_dim, self.num_heads, ""), (self.decoder_dim, self.decoder_heads, "decoder_")):
            if dim % heads or dim % 4:
                raise ConfigError(f"model.{name}dim={dim} must be a multiple of 4 and of model.{name}heads={heads}")


@dataclass
class MAEConfig:
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(strength=0.5))


# --------------------------------------------------------
# 2D sine-cosine position embedding
# Transformer: https://github.com/tensorflow/models/blob/master/official/nlp/transformer/model_utils.py
# MoCo v3: https://github.com/facebookresearch/moco-v3
# --------------------------------------------------------
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2D sin-cos embeddings for a square grid of patches.

    Returns a float64 array of shape (grid_size*grid_size, embed_dim), or
    (1 + grid_size*grid_size, embed_dim) with an all-zero leading row when cls_token is
    set (the cls token has no position).
    """
    if embed_dim % 4 != 0:
        # half the channels encode each axis, and each half splits again into sin and cos
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # w first, so rows of the flattened grid run along w
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)

    emb_h = _get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = _get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    pos_embed = np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)  # (1+H*W, D)
    return pos_embed


def _get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)  geometric frequencies, as in the Transformer

    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


class MaskedAutoencoder(nn.Module):
    """Masked autoencoder with a ViT backbone."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        # Imported where the model is built: timm pulls in torchvision and torch._dynamo (2-3 s on
        # two cores), which a sweep's driver, that never builds one, need not pay.
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        # --------------------------------------------------------------------------
        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos embeddings: buffers rather than frozen parameters, so they travel
        # with state_dict and .to() but never reach an optimizer.
        self.register_buffer("pos_embed", torch.zeros(1, num_patches + 1, embed_dim))

        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim)

        # --------------------------------------------------------------------------
        # decoder: narrower and shallower than the encoder, since it exists only for
        # pre-training and must process the full set of tokens
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, num_patches + 1, decoder_dim))

        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self) -> None:
        grid_size = self.patch_embed.grid_size[0]
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size, cls_token=True)
        self.pos_embed.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        decoder_pos_embed = get_2d_sincos_pos_embed(
            self.decoder_pos_embed.shape[-1], grid_size, cls_token=True
        )
        self.decoder_pos_embed.copy_(torch.from_numpy(decoder_pos_embed).float().unsqueeze(0))

        # The patch projection is a linear map on flattened patches; initialise it as one
        # rather than with the conv default, which scales by fan-in only.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            # xavier_uniform following the official JAX ViT
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels as (p, p, C)."""
        p = self.patch_embed.patch_size[0]
        h, w = self.patch_embed.grid_size
        c = imgs.shape[1]

        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)  # (B, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
        return x.reshape(imgs.shape[0], h * w, p * p * c)  # (B, L, p*p*C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W); exact inverse of patchify."""
        p = self.patch_embed.patch_size[0]
        h, w = self.patch_embed.grid_size
        c = x.shape[-1] // (p * p)

        x = x.reshape(x.shape[0], h, w, p, p, c)  # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (B, C, H, W)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a uniformly random subset of round(L * (1 - mask_ratio)) tokens per sample.

        Per-sample shuffling is done by argsort of uniform noise, so every subset of that
        size is equally likely. Pass a generator (on x's device) for a reproducible mask.

        Returns the kept tokens (B, L_keep, D), the binary mask (B, L) with 1 = masked,
        and ids_restore (B, L), the permutation that undoes the shuffle.
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        N, L, D = x.shape  # (B, L, D)
        len_keep = round(L * (1 - mask_ratio))

        noise = torch.rand(N, L, device=x.device, generator=generator)  # (B, L) in [0, 1)

        # ascend: small noise is kept, large is removed
        ids_shuffle = torch.argsort(noise, dim=1)  # (B, L)
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)

        ids_keep = ids_shuffle[:, :len_keep]  # (B, L_keep)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))  # (B, L_keep, D)

        # build the mask in shuffled order, where the kept tokens come first, then unshuffle
        mask = torch.ones([N, L], device=x.device)  # (B, L)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # (B, L)

        return x_masked, mask, ids_restore

    def _embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        # position is added before masking, so each kept token still knows where it came from
        x = self.patch_embed(imgs)  # (B, L, D)
        return x + self.pos_embed[:, 1:, :]  # (B, L, D)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        cls_token = self.cls_token + self.pos_embed[:, :1, :]  # (1, 1, D)
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat((cls_tokens, x), dim=1)  # (B, 1+N, D)

        for blk in self.blocks:
            x = blk(x)  # (B, 1+N, D)
        return self.norm(x)  # (B, 1+N, D)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self._embed_patches(imgs)  # (B, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)  # (B, L_keep, D)
        x = self._encode(x)  # (B, 1+L_keep, D)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # (B, 1+L_keep, Dd)

        # every masked position gets the same learned token; only its position tells them apart
        n_masked = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.repeat(x.shape[0], n_masked, 1)  # (B, L-L_keep, Dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
        x_ = torch.gather(
            x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2])
        )  # (B, L, Dd) back in patch order
        x = torch.cat([x[:, :1, :], x_], dim=1)  # (B, 1+L, Dd)

        x = x + self.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)  # (B, 1+L, Dd)
        x = self.decoder_norm(x)  # (B, 1+L, Dd)

        x = self.decoder_pred(x)  # (B, 1+L, p*p*C)
        return x[:, 1:, :]  # (B, L, p*p*C)  the cls token reconstructs nothing

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches only.

        imgs (B, C, H, W), pred (B, L, p*p*C), mask (B, L) with 1 = masked.
        """
        target = self.patchify(imgs)  # (B, L, p*p*C)
        if self.norm_pix_loss:
            # per-patch normalised targets: the paper finds these give better representations
            mean = target.mean(dim=-1, keepdim=True)  # (B, L, 1)
            var = target.var(dim=-1, keepdim=True)  # (B, L, 1)
            target = (target - mean) / (var + 1.0e-6) ** 0.5  # (B, L, p*p*C)

        loss = (pred - target) ** 2  # (B, L, p*p*C)
        loss = loss.mean(dim=-1)  # (B, L)  mean loss per patch

        # clamp: with mask_ratio 0 nothing is masked, and the loss is 0 rather than 0/0
        return (loss * mask).sum() / mask.sum().clamp(min=1)  # ()

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (B, C, H, W) -> loss (), pred (B, L, p*p*C), mask (B, L) with 1 = masked."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)  # (B, 1+L_keep, D)
        pred = self.forward_decoder(latent, ids_restore)  # (B, L, p*p*C)
        loss = self.forward_loss(imgs, pred, mask)  # ()
        return loss, pred, mask

    def forward_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder on all patches, no masking: one token per patch (B, L, D), in raster order."""
        x = self._embed_patches(imgs)  # (B, L, D)
        return self._encode(x)[:, 1:, :]  # (B, L, D)  without the cls token

    def freeze_decoder(self) -> None:
        """Leave the decoder (and the mask token) out of training, and out of DDP's gradient buckets:
        a task that uses the encoder alone (fine-tuning, regression) never updates them."""
        for name, p in self.named_parameters():
            if name.startswith(("decoder", "mask_token")):
                p.requires_grad_(False)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Mean-pooled patch tokens (B, D), for probing or fine-tuning."""
        return self.forward_tokens(imgs).mean(dim=1)  # (B, D)


def mae_from(m: MAEModelConfig) -> MaskedAutoencoder:
    """The model of an MAE config section: this task's ``model``, or another task's encoder (``encoder.mae``)."""
    return MaskedAutoencoder(
        img_size=m.img_size, patch_size=m.patch_size, in_chans=1, embed_dim=m.embed_dim, depth=m.depth,
        num_heads=m.num_heads, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads, norm_pix_loss=m.norm_pix_loss,
    )


def build_model(cfg) -> MaskedAutoencoder:
    return mae_from(cfg.model)


def collate(batch: dict, cfg, training: bool) -> dict:
    return {"image": resized(batch_images(batch, cfg.augment, training), cfg.model.img_size)}  # (B, 1, size, size)


def train_step(model, batch: dict, cfg) -> dict:
    loss, _, _ = model(batch["image"], cfg.model.mask_ratio)
    return {"loss": loss}


def _fixed_mask(images: torch.Tensor) -> torch.Generator:
    # Validation uses the same masks every epoch, so its loss measures the model, not the dice.
    return torch.Generator(device=images.device).manual_seed(0)


def eval_step(model, batch: dict, cfg) -> dict:
    images = batch["image"]  # (B, 1, H, W)
    loss, _, _ = model(images, cfg.model.mask_ratio, generator=_fixed_mask(images))
    # Every image has the same number of masked patches, so the batch mean repeated per
    # image averages to the exact mean over the split.
    return {"loss": loss.float().expand(len(images))}


def evaluate(outputs: dict, cfg) -> dict:
    return {"loss": float(outputs["loss"].mean())}


def plots(model, batch: dict, outputs: dict, cfg) -> dict:
    images = batch["image"][:6]  # (N, 1, H, W)
    with torch.no_grad():
        _, pred, mask = model(images, cfg.model.mask_ratio, generator=_fixed_mask(images))
        if cfg.model.norm_pix_loss:  # predictions are per-patch normalised: undo with the true statistics
            target = model.patchify(images)
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand_as(pred).float())  # (N, 1, H, W), 1 = masked
        reconstruction = model.unpatchify(pred)  # (N, 1, H, W)
    rows = {
        "original": images,
        "masked": images * (1 - pixel_mask),
        "reconstructed": reconstruction,
        "visible + reconstructed": images * (1 - pixel_mask) + reconstruction * pixel_mask,
    }
    rows = {name: v[:, 0].float().cpu().numpy() for name, v in rows.items()}
    return {"reconstructions.png": image_rows_figure(rows, f"mask ratio {cfg.model.mask_ratio:.2f}")}


def embed(model: MaskedAutoencoder, batch: dict, cfg) -> torch.Tensor:
    return model.forward_features(batch["image"])  # (B, D): every patch seen, mean-pooled


register(Task(
    name="mae",
    config=MAEConfig,
    build_model=build_model,
    build_data=data.substructure,
    collate=collate,
    train_step=train_step,
    eval_step=eval_step,
    evaluate=evaluate,
    metric="loss",
    mode="min",
    plots=plots,
    embed=embed,
    defaults={"train.lr": 1.5e-3, "train.weight_decay": 0.05, "train.batch_size": 64},
    description="masked-autoencoder pretraining (ViT encoder, light decoder)",
))
