"""Image codecs behind one interface: images in [-1, 1] (B, 3, H, W) <-> latents (B, c, h, w).

- `VaeCodec`: SDXL `AutoencoderKL` (OmniGen-v1's codec) from a local folder; latents are
  `(z - shift_factor) * scaling_factor` with both factors read from the VAE's config (as
  OmniGen's pipeline does; SDXL: scaling 0.13025, no shift).
- `PixelCodec`: pixel_unshuffle by 2 (12 channels at H/2) for the `tiny` CPU demo: lossless and
  free, so a ~1M-parameter model learns fusion in minutes.
Codecs are frozen: they never train and never enter checkpoints of LoRA runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Codec(nn.Module):
    channels: int
    downsample: int

    def encode(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [-1, 1] -> (B, c, H/d, W/d)
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:  # (B, c, h, w) -> (B, 3, h*d, w*d) in ~[-1, 1]
        raise NotImplementedError

    def check_size(self, height: int, width: int, multiple: int) -> None:
        if height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} must be a multiple of {multiple} "
                             f"(codec downsample {self.downsample} x patch size); resize or pad the inputs")


class PixelCodec(Codec):
    channels = 12
    downsample = 2

    def encode(self, images: Tensor) -> Tensor:
        return F.pixel_unshuffle(images, 2)  # (B, 12, H/2, W/2)

    def decode(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, 2)  # (B, 3, H, W)


class VaeCodec(Codec):
    downsample = 8

    def __init__(self, vae: nn.Module, sample_posterior: bool = False) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.channels = int(cfg.latent_channels)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.sample_posterior = sample_posterior

    def train(self, mode: bool = True) -> "VaeCodec":  # the VAE stays in eval mode
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample() if self.sample_posterior else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample

    @classmethod
    def from_path(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "VaeCodec":
        path = Path(path)
        for cand in (path / "vae", path):
            if (cand / "config.json").is_file():
                break
        else:
            raise FileNotFoundError(
                f"no VAE at {path} (looked for vae/config.json and config.json): set --model.vae_path to a local "
                "SDXL VAE folder (diffusers AutoencoderKL layout); nothing is downloaded")
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL.from_pretrained(str(cand), torch_dtype=dtype, local_files_only=True))


def build_codec(kind: str, vae_path: str | Path | None = None) -> Codec:
    if kind == "pixel":
        return PixelCodec()
    if kind == "vae":
        if vae_path is None:
            raise ValueError("the VAE codec needs a local path: set --model.vae_path (or --model.pretrained with a vae/ folder)")
        return VaeCodec.from_path(vae_path)
    raise ValueError(f"unknown codec {kind!r}: use 'pixel' or 'vae'")
