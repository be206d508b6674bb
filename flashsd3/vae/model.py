"""SD3's VAE: an LDM AutoencoderKL with 16 latent channels and no quant convs.

Paper: Esser et al. 2024, "Scaling Rectified Flow Transformers" ("Improved Autoencoders": 16 channels);
architecture from Rombach et al. 2022 (LDM). Official code: Stability-AI/sd3.5 `sd3_impls.py` (SDVAE).
diffusers: `models/autoencoders/autoencoder_kl.py` (AutoencoderKL), `autoencoders/vae.py` (Encoder,
Decoder, DiagonalGaussianDistribution), `unets/unet_2d_blocks.py` (UNetMidBlock2D, Down/UpDecoderBlock2D).

Parameter names are diffusers' (`decoder.up_blocks.0.resnets.1.conv1`, `mid_block.attentions.0.to_q`),
so a diffusers file loads unchanged; the LDM names of Stability single files map through
`flashsd3/keymaps/vae.py` (loader: `vae/loading.py`). Shapes: images (B, 3, H, W) in [-1, 1]; VAE
latents z (B, 16, H/8, W/8).
The diffusion model works on `vae_to_latents(z)`, normalised by the config's scale and shift.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import SD3_VAE, VAEConfig

EPS = 1e-6  # every GroupNorm of the LDM autoencoder (diffusers resnet_eps=1e-6)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=EPS)


def _cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on the CPU, which every layer here keeps (conv, GroupNorm, pad, interpolate, SiLU, add):
    oneDNN's bf16 convolutions ran 1.4-1.9x faster on NHWC than on NCHW at the decoder's 512^2 and 1024^2
    levels (bench/RESULTS.md). Other devices keep the caller's layout (not measured there)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus a skip (1x1 conv where the channel count changes)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At 1024 px one activation is 128-256 channels x 1024^2. In-place SiLU/add and nesting the
        # calls (each intermediate dies as soon as it is used) keep at most x + 2 of them alive;
        # diffusers keeps up to 3 besides x (peaks measured in tests/test_vae.py).
        h = self.norm2(self.conv1(F.silu(self.norm1(x), inplace=True)))
        h = self.conv2(F.silu(h, inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (C-dim head), with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers name: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        # SDPA picks a fused kernel: 128x128 latents are 16384 tokens, never an explicit HW x HW matrix
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one (LDM's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _resnets(c_in: int, c_out: int, n: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n))


class DownBlock(nn.Module):
    """Encoder level's parameters: resnets, then a Downsample except at the last level
    (diffusers DownEncoderBlock2D). Run by `Encoder.forward` layer by layer."""

    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = _resnets(c_in, c_out, n_resnets, groups)
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if downsample else [])  # diffusers name



class UpBlock(nn.Module):
    """Decoder level's parameters: resnets, then an Upsample except at the last level
    (diffusers UpDecoderBlock2D). Run by `Decoder.forward` layer by layer."""

    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = _resnets(c_in, c_out, n_resnets, groups)
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if upsample else [])  # diffusers name



class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([AttnBlock(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> mean and log-variance stacked on channels (B, 2*latent, H/f, W/f)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(_cpu_layout(x))
        for block in self.down_blocks:
            for layer in (*block.resnets, *block.downsamplers):
                h = layer(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True)).contiguous()


class Decoder(nn.Module):
    """VAE latents z (B, latent, h, w) -> image (B, 3, h*f, w*f). Levels run widest-first."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        # one more resnet per level than the encoder (LDM num_res_blocks + 1)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(_cpu_layout(z)))
        for block in self.up_blocks:
            for layer in (*block.resnets, *block.upsamplers):
                h = layer(h)  # layer by layer: a level's input is freed once its first resnet is done
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True)).contiguous()  # 3 channels: cheap


@dataclass
class DiagonalGaussian:
    """The encoder's posterior over VAE latents (diffusers DiagonalGaussianDistribution)."""

    mean: torch.Tensor  # (B, latent, h, w)
    logvar: torch.Tensor  # same shape, clamped to [-30, 20] as LDM/diffusers do

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; noise is drawn on the generator's device, then moved (as diffusers)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class VAE(nn.Module):
    """Encoder + decoder in the VAE's own latent space (diffusers AutoencoderKL.encode/decode)."""

    def __init__(self, config: VAEConfig = SD3_VAE):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (the decoder's input conv stands for all: `to(dtype)` converts every one)."""
        return self.decoder.conv_in.weight.dtype

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel per side (8 for SD3)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, image: torch.Tensor) -> DiagonalGaussian:
        """image (B, 3, H, W) in [-1, 1], H and W multiples of `downscale` -> posterior over z."""
        return DiagonalGaussian.from_moments(self.encoder(image))

    def decode(self, z: torch.Tensor, *, tile: int | None = None, overlap: int | None = None) -> torch.Tensor:
        """z (B, latent, h, w) -> image (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped).

        tile=None (default): one pass, exact. tile=T: decode overlapping T x T latent tiles one at a
        time, `overlap` latent pixels shared between neighbours (default T // 4) and blended linearly;
        see `decode_tiled` for how this relates to diffusers' tiled decode.
        """
        if tile is None:
            return self.decoder(z)
        return decode_tiled(self.decoder, z, tile, tile // 4 if overlap is None else overlap, self.downscale)

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion-model latents -> VAE latents z (SD3 pipeline: latents / 1.5305 + 0.0609)."""
        return latents / self.config.scaling_factor + self.config.shift_factor

    def vae_to_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents z -> diffusion-model latents: (z - shift) * scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor


# Tiled decoding ------------------------------------------------------------------------------

def _blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> None:
    """In place: the first e rows (dim 2) / columns (dim 3) of `cur` ramp linearly from the last e
    of `prev` to `cur`'s own, e = min(sizes, extent) (diffusers blend_v / blend_h)."""
    e = min(prev.shape[dim], cur.shape[dim], extent)
    if e == 0:
        return
    shape = [1, 1, 1, 1]
    shape[dim] = e
    w = (torch.arange(e, dtype=torch.float64) / e).view(shape)  # y / e, as diffusers' Python floats
    head = cur.narrow(dim, 0, e)
    tail = prev.narrow(dim, prev.shape[dim] - e, e)
    head.copy_(tail * (1 - w).to(cur) + head * w.to(cur))


def decode_tiled(decoder: Decoder, z: torch.Tensor, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """Decode z in tiles of `tile` latent pixels starting every `tile - overlap`, blending the
    `overlap * factor` image pixels where neighbours meet.

    Same grid, ramps and crops as diffusers' AutoencoderKL.tiled_decode with tile_latent_min_size=tile,
    tile_sample_min_size=tile*factor, tile_overlap_factor=overlap/tile (equal output, tests/test_vae.py),
    and, like diffusers' decode, z no larger than one tile is decoded in one pass. Differences: tiles
    are blended as they are decoded, keeping only the output and one row of overlap strips (diffusers
    keeps every decoded tile to the end, (tile/stride)^2 times the image); overlap is given in latent
    pixels, so stride and crop always agree (diffusers' int() of a fractional factor can make them
    differ); in fp16/bf16 the ramp weights are rounded to that dtype (diffusers multiplies by Python
    floats), so the last bit may differ. Like diffusers, every start in range(0, h, stride) gets a
    tile, even one the previous tile already covers. Tiles see only their own pixels in GroupNorm
    and attention, so the result is close to, not equal to, the one-pass decode.
    """
    B, _, H, W = z.shape
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile): got tile={tile}, overlap={overlap}")
    if H <= tile and W <= tile:
        return decoder(z)
    stride, blend, keep = tile - overlap, overlap * factor, (tile - overlap) * factor
    out, above = None, {}  # above[x]: bottom strip of the finished tile above column x
    for y in range(0, H, stride):
        left = None  # right strip of the finished tile to the left
        for x in range(0, W, stride):
            t = decoder(z[:, :, y:y + tile, x:x + tile])
            if out is None:
                out = t.new_empty(B, t.shape[1], H * factor, W * factor)
            if y > 0:
                _blend(above[x], t, blend, dim=2)
            if left is not None:
                _blend(left, t, blend, dim=3)
            above[x] = t[:, :, max(t.shape[2] - blend, 0):].clone()
            left = t[:, :, :, max(t.shape[3] - blend, 0):].clone()
            out[:, :, y * factor:y * factor + keep, x * factor:x * factor + keep] = t[:, :, :keep, :keep]
    return out
