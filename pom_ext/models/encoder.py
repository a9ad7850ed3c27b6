"""PolymorpherEncoder: a non-causal stack of PoM blocks (optionally hybrid) with a classification head.

Inputs are either token sequences (num_tokens, max_len) or images cut into patches (image_size, patch_size).
Non-causal PoM mixing is a mean over the sequence, blind to order, so the encoder adds learned absolute
position embeddings.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .blocks import build_blocks, check_int, check_rate, init_weights, resolve_layer_pattern


def _pair(owner: str, name: str, value) -> Tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{owner}: argument '{name}' must be an integer or a pair of integers, got {value!r}")
    for v in pair:
        check_int(owner, name, v, 1)
    return pair


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, (H / p) (W / p), D) by a stride-p convolution."""

    def __init__(self, image_size, patch_size, in_chans: int, dim: int):
        super().__init__()
        owner = "pom_ext.models.PatchEmbed"
        self.image_size = _pair(owner, "image_size", image_size)
        self.patch_size = _pair(owner, "patch_size", patch_size)
        check_int(owner, "in_chans", in_chans, 1)
        if any(i % p for i, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f"{owner}: argument 'patch_size' {self.patch_size} must divide 'image_size' "
                             f"{self.image_size}")
        self.in_chans = in_chans
        self.grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = (self.in_chans, *self.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"pom_ext.models.PatchEmbed: argument 'x' must be images (B, C, H, W) with "
                             f"(C, H, W) = {want}, got {got}")
        return self.proj(x).flatten(2).transpose(1, 2)


class PolymorpherEncoder(nn.Module):
    """Non-causal encoder + classifier.

    Tokens: PolymorpherEncoder(num_classes, dim, depth, num_tokens=V, max_len=L); forward(x: (B, N) long, N <= L).
    Images: PolymorpherEncoder(num_classes, dim, depth, image_size=32, patch_size=4, in_chans=3);
    forward(x: (B, C, H, W)).
    mask: None, or (B, N) bool / float weights over the tokens (padding: False / 0 for padded positions);
    it drives the PoM aggregation, the attention and the pooling. pool: "mean" (masked mean of the tokens) or
    "cls" (a learned class token). forward -> logits (B, num_classes); features -> (B, N, D).
    rope: None, "1d" (rotary positions 0..N-1 in the PoM blocks, the class token first) or, for images, "2d"
    (rotary positions over the patch grid, the class token at (0, 0)); the learned position embedding stays.
    """

    def __init__(self, num_classes: int, dim: int, depth: int, *, num_tokens: Optional[int] = None,
                 max_len: Optional[int] = None, image_size=None, patch_size=None, in_chans: int = 3,
                 degree: int = 2, expand: int = 2, n_sel_heads: int = 1, n_groups: int = 1, mlp_ratio: float = 4.0,
                 layer_pattern: Optional[str] = None, attn_every: Optional[int] = None,
                 n_heads: Optional[int] = None, window: Optional[int] = None, pool: str = "mean",
                 bias: bool = False, dropout: float = 0.0, rope: Optional[str] = None):
        super().__init__()
        owner = "pom_ext.models.PolymorpherEncoder"
        check_int(owner, "num_classes", num_classes, 1)
        check_int(owner, "dim", dim, 1)
        check_rate(owner, "dropout", dropout)
        if pool not in ("mean", "cls"):
            raise ValueError(f"{owner}: argument 'pool' must be 'mean' or 'cls', got {pool!r}")
        if (num_tokens is None) == (patch_size is None):
            raise ValueError(f"{owner}: give exactly one of 'num_tokens' (token sequences) and 'patch_size' "
                             f"(images), got num_tokens={num_tokens!r}, patch_size={patch_size!r}")
        if num_tokens is not None:
            check_int(owner, "num_tokens", num_tokens, 1)
            if max_len is None:
                raise ValueError(f"{owner}: argument 'max_len' (the longest token sequence) is required with "
                                 f"'num_tokens'")
            check_int(owner, "max_len", max_len, 1)
            self.embed: Union[nn.Embedding, PatchEmbed] = nn.Embedding(num_tokens, dim)
            self.max_len = max_len
        else:
            if image_size is None:
                raise ValueError(f"{owner}: argument 'image_size' is required with 'patch_size'")
            self.embed = PatchEmbed(image_size, patch_size, in_chans, dim)
            self.max_len = self.embed.num_patches
        self.pattern = resolve_layer_pattern(depth, layer_pattern, attn_every, owner)
        self.pool, self.dim = pool, dim
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.zeros(1, self.max_len, dim))
        self.drop = nn.Dropout(dropout)
        if rope not in (None, "1d", "2d") or (rope == "2d" and num_tokens is not None):
            raise ValueError(f"{owner}: argument 'rope' must be None, '1d' or (images) '2d', got {rope!r}")
        extra = 1 if pool == "cls" else 0
        rope_args = {} if rope is None else dict(rope=rope, rope_max_len=self.max_len + extra)
        if rope == "2d":
            rope_args.update(rope_grid=self.embed.grid, rope_cls_token=pool == "cls")
        self.blocks = build_blocks(dim, self.pattern, degree=degree, expand=expand, n_sel_heads=n_sel_heads,
                                   n_groups=n_groups, mlp_ratio=mlp_ratio, conv_size=0, n_heads=n_heads,
                                   window=window, bias=bias, dropout=dropout, owner=owner, **rope_args)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_weights(self, depth)
        nn.init.normal_(self.pos, std=0.02)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, nn.Embedding):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                got = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"pom_ext.models.PolymorpherEncoder: argument 'x' must be a (B, N) integer "
                                 f"tensor of tokens, got {got}")
            if x.shape[1] > self.max_len:
                raise ValueError(f"pom_ext.models.PolymorpherEncoder: argument 'x' has {x.shape[1]} tokens, "
                                 f"more than max_len = {self.max_len}")
        z = self.embed(x)
        return z + self.pos[:, : z.shape[1]]

    def features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token features (B, N, D) (N + 1 with pool='cls', the class token first), after the final norm."""
        z = self._embed(x)
        B, N, _ = z.shape
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, N) or \
                    not (mask.dtype == torch.bool or mask.is_floating_point()):
                got = f"shape {tuple(mask.shape)}, {mask.dtype}" if isinstance(mask, torch.Tensor) \
                    else type(mask).__name__
                raise ValueError(f"pom_ext.models.PolymorpherEncoder: argument 'mask' must be a bool or float "
                                 f"(B, N) = {(B, N)} tensor, got {got}")
        if self.cls is not None:
            z = torch.cat([self.cls.expand(B, -1, -1).to(z.dtype), z], dim=1)
            if mask is not None:
                mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(z.dtype)
        z = self.drop(z)
        for block in self.blocks:
            z = block(z, mask=mask)
        return self.norm(z)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = self.features(x, mask)
        if self.cls is not None:
            pooled = z[:, 0]
        elif mask is None:
            pooled = z.mean(1)
        else:
            w = mask.to(z.dtype).unsqueeze(-1)
            pooled = (z * w).sum(1) / w.sum(1).clamp_min(torch.finfo(z.dtype).tiny)
        return self.head(pooled)
