"""Masked autoencoder (He et al., 2022) around a timm ViT encoder, with the parameter names of MAE's own
checkpoints (the decoder's start with ``decoder_``), so a pretraining checkpoint loads as a teacher wherever
MAE's does and ``encoder`` exports as a plain timm ``VisionTransformer``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import InputError


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid_h·grid_w, dim), MAE's: sin, cos of the column, then of the row."""
    if dim % 4:
        raise InputError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        angles = pos[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def init_encoder_as_mae(encoder: nn.Module) -> None:
    """A fresh encoder initialised as MAE's, in place: every Linear xavier-uniform (bias 0), the patch embedding
    likewise on its flattened kernel, the class token N(0, 0.02²), and the positions fixed 2-D sin-cos on the
    patches, 0 on the prefix tokens, not trained (timm's own init is N(0, 0.02²) weights, learned positions)."""
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        kernel = encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(kernel.view(kernel.shape[0], -1))
        if encoder.cls_token is not None:
            nn.init.normal_(encoder.cls_token, std=0.02)
    pos = encoder.pos_embed
    if pos is None:
        return
    if pos.shape[-1] % 4:
        raise InputError(
            f"MAE's fixed 2-D sin-cos positions need an encoder width divisible by 4, got {pos.shape[-1]}: make "
            "model.kwargs.embed_dim a multiple of 4"
        )
    grid = tuple(encoder.patch_embed.grid_size)
    with torch.no_grad():
        pos.zero_()[:, pos.shape[1] - grid[0] * grid[1] :] = sincos_pos_embed_2d(pos.shape[-1], grid)
    pos.requires_grad_(False)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) → (B, N, patch·patch·C), patches in raster order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """The inverse of `patchify`."""
    b = patches.shape[0]
    x = patches.reshape(b, grid[0], grid[1], patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid[0] * patch, grid[1] * patch)


def kept_patches(num_patches: int, mask_ratio: float) -> int:
    """How many of ``num_patches`` the encoder sees at ``mask_ratio``: MAE's count, the rest truncated, in the
    float expression of MAE's ``random_masking`` (``int(L * (1 - mask_ratio))``), so it agrees to the patch."""
    return int(num_patches * (1 - mask_ratio))


Generators = torch.Generator | Sequence[torch.Generator] | None


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, device=None, generator: Generators = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep_idx (B, K), mask (B, N))``, mask 1 on hidden patches: each image keeps the K (at least one)
    patches of smallest uniform noise, so each subset of size K is equally likely. ``generator`` a sequence:
    one per image, whose noise it alone draws, so an image's mask does not depend on the batch it is in."""
    keep = kept_patches(num_patches, mask_ratio)
    if not 0.0 <= mask_ratio < 1.0 or keep < 1:
        raise ValueError(f"mask_ratio must be in [0, 1) and keep one of {num_patches} patches: {mask_ratio}")
    if isinstance(generator, Sequence):
        if len(generator) != batch:
            raise ValueError(f"one generator per image: got {len(generator)} for {batch} images")
        noise = torch.stack([torch.rand(num_patches, generator=g, device=g.device) for g in generator])
        noise = noise.to(device)
    else:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    keep_idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # raster order inside the kept set
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, keep_idx, 0.0)
    return keep_idx, mask


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE in fp32; ``norm_pix``: targets normalised per patch."""
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class MAEOutput:
    """One MAE forward pass; ``terms``/``logs`` follow the engine's convention."""

    loss: torch.Tensor
    pred: torch.Tensor  # (B, N, patch²·C), in normalised-pixel units when norm_pix
    mask: torch.Tensor  # (B, N), 1 = hidden from the encoder
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class MaskedAutoencoder(nn.Module):
    """An MAE around ``encoder``, a fixed-size timm ``VisionTransformer`` whose modules are registered here
    under their own names (the same objects), so ``state_dict()`` has MAE's checkpoint layout and
    ``self.encoder`` stays a complete timm model."""

    def __init__(
        self,
        encoder: nn.Module,
        *,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix: bool = True,
    ):
        super().__init__()
        # masking reads pixel patches and prefix tokens: no distilled DeiT (2 of them), no hybrid's CNN stem
        what = None if type(encoder) is VisionTransformer else type(encoder).__name__
        if what is None and not isinstance(encoder.patch_embed, PatchEmbed):
            what = f"ViT with a {type(encoder.patch_embed).__name__} stem"
        if what is not None:
            raise InputError(
                f"MAE pre-training needs a plain ViT (timm's VisionTransformer, e.g. vit_base_patch16_224), not "
                f"a {what}: choose such a model.name"
            )
        if getattr(encoder, "dynamic_img_size", False):
            raise InputError(
                "MaskedAutoencoder needs a fixed image size (build the encoder without dynamic_img_size)"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.__dict__["encoder"] = encoder  # not a submodule: its parts are registered below by name
        for name, child in encoder.named_children():
            self.add_module(name, child)
        for name, param in encoder.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix
        self.patch = encoder.patch_embed.patch_size[0]
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.in_chans = encoder.patch_embed.proj.in_channels
        side = encoder.patch_embed.img_size[0]
        if side % self.patch:  # patchify cuts the image into whole patches, the loss's targets
            low = side - side % self.patch
            near = " and ".join(f"{s} px" for s in (low, low + self.patch) if s)
            raise InputError(
                f"MAE pre-training cuts the image into {self.patch} px patches (model.kwargs.patch_size), and "
                f"{side} px (data.img_size) is not a multiple of {self.patch}: nearest sizes that work: {near}"
            )
        if norm_pix and self.patch**2 * self.in_chans < 2:  # the unbiased variance of one value is NaN
            raise InputError(
                f"mae.norm_pix normalises each patch by its values' variance, and a {self.patch} px patch of "
                f"{self.in_chans} channel has one value: set mae.norm_pix=false or larger model.kwargs.patch_size"
            )
        patches = self._num_patches = self.grid[0] * self.grid[1]
        if patches < 2:
            raise InputError(
                f"MAE pre-training hides some patches and keeps some, and a {side} px image (data.img_size) is "
                f"one {self.patch} px patch (model.kwargs.patch_size): use smaller patches or larger images"
            )
        keep = kept_patches(patches, mask_ratio)
        if keep in (0, patches):  # the loss is on the hidden patches alone; the encoder sees the kept ones
            fix = f"at most {(1000 * (patches - 1) - 1) // patches / 1000:g}" if keep == 0 else "above 0"
            raise InputError(
                f"mae.mask_ratio={mask_ratio} {'keeps' if keep == 0 else 'hides'} none of the encoder's {patches} "
                f"patches (MAE keeps int(N·(1 − mask_ratio)) of N): set it {fix} (MAE's is 0.75)"
            )

        self.grad_checkpointing = False
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # fixed, as in the paper: a Parameter without gradient, so checkpoints carry it like MAE's
        pos = torch.cat([torch.zeros(1, decoder_dim), sincos_pos_embed_2d(decoder_dim, self.grid)])
        self.decoder_pos_embed = nn.Parameter(pos[None], requires_grad=False)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: the encoder's and the decoder's blocks recompute their activations in the backward."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "mask_token", "decoder_pos_embed"}

    def forward_encoder(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """The encoder on the kept patches only: (B, prefix + K, width), after its final norm."""
        enc = self.encoder
        x = enc.patch_embed(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        prefix = [t.expand(x.shape[0], -1, -1) for t in (enc.cls_token, enc.reg_token) if t is not None]
        if enc.pos_embed is not None:
            if enc.no_embed_class:
                x = x + enc.pos_embed
            else:
                n_pre = enc.num_prefix_tokens
                x = x + enc.pos_embed[:, n_pre:]
                prefix = [torch.cat(prefix, 1) + enc.pos_embed[:, :n_pre]] if prefix else []
        x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([*prefix, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        x = checkpoint_seq(enc.blocks, x) if self.grad_checkpointing else enc.blocks(x)
        return enc.norm(x)

    def forward_decoder(self, latent: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Mask tokens in the hidden places, position embedding, decoder blocks: (B, N, patch²·C)."""
        n_pre = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)
        b, n = x.shape[0], self._num_patches
        full = self.mask_token.to(x.dtype).expand(b, n, -1).clone()
        full.scatter_(1, keep_idx[..., None].expand(-1, -1, x.shape[-1]), x[:, n_pre:])
        # one decoder token stands for the encoder's prefix (class token), as in MAE
        head = x[:, :1] if n_pre else self.mask_token.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([head, full], dim=1) + self.decoder_pos_embed.to(x.dtype)
        blocks = self.decoder_blocks
        x = self.decoder_norm(checkpoint_seq(blocks, x) if self.grad_checkpointing else blocks(x))
        return self.decoder_pred(x[:, 1:])

    def target(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.patch)

    def forward(self, images: torch.Tensor, generator: Generators = None) -> MAEOutput:
        """Mask (``generator`` as `random_masking`'s), encode, decode, and score the hidden patches' reconstruction."""
        keep_idx, mask = random_masking(
            images.shape[0], self._num_patches, self.mask_ratio, device=images.device, generator=generator
        )
        pred = self.forward_decoder(self.forward_encoder(images, keep_idx), keep_idx)
        loss = masked_patch_loss(pred, self.target(images), mask, norm_pix=self.norm_pix)
        return MAEOutput(loss=loss, pred=pred, mask=mask, terms={"mae": loss})

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, C, H, W): the masked input, the reconstruction (kept patches pasted back), the original."""
        out = self(images, generator=generator)
        target = self.target(images).float()
        pred = out.pred.float()
        if self.norm_pix:
            mean = target.mean(-1, keepdim=True)
            std = (target.var(-1, keepdim=True) + 1e-6).sqrt()
            pred = pred * std + mean
        m = out.mask[..., None]
        recon = pred * m + target * (1 - m)
        gray = (target.amin() + target.amax()) / 2
        shown = target * (1 - m) + gray * m  # hidden patches drawn mid-gray, apart from black and white
        to_img = lambda p: unpatchify(p, self.patch, self.grid, self.in_chans)
        return torch.stack([to_img(shown), to_img(recon), images.float()], dim=1)
