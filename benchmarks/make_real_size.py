"""Write a full-size OmniGen-v1 release folder of random weights (3.8B parameters), laid out as the
release (huggingface.co/Shitao/OmniGen-v1) lays it out, for benchmarks/real_size.py:

  FOLDER/config.json          the release's Phi-3 config (benchmarks/omnigen_v1_config.json)
  FOLDER/model.safetensors    original key names (llm.* with fused qkv_proj, x_embedder, ...), bf16
  FOLDER/tokenizer*.json      the Llama-style test tokenizer (tests/_release.py), not Phi-3's
  FOLDER/vae/                 an SDXL-shaped AutoencoderKL (diffusers' SDXL VAE config), random, fp32

bf16 on disk (7.6 GB; the release ships bf16 too, its config says torch_dtype bfloat16): fp32
would be 15 GB, more than the page cache this shared machine can spare. The file is streamed
tensor by tensor (header first, then each tensor drawn and written), so the process never holds
more than the largest tensor (the token embedding, 32064 x 3072) in fp32.

  heavy python benchmarks/make_real_size.py /work/realsize/OmniGen-v1-random
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
RELEASE_CONFIG = Path(__file__).with_name("omnigen_v1_config.json")
# diffusers' SDXL VAE (stabilityai/stable-diffusion-xl-base-1.0 vae/config.json): 83.7M parameters
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True)
STD = 0.02  # Phi-3's initializer_range (config.json)


def original_shapes(phi3: dict, layers: int | None = None) -> dict[str, torch.Size]:
    """Original OmniGen key -> shape, from the diffusers model built on the meta device."""
    from ditfuse.interop.convert import (
        _empty_transformer,
        convert_diffusers_state_dict,
        transformer_config_from_original,
    )

    config = transformer_config_from_original(phi3)
    if layers is not None:
        config["num_layers"] = layers
    meta = _empty_transformer(config, buffers=True).state_dict()
    return {k: v.shape for k, v in sorted(convert_diffusers_state_dict(meta).items())}


def draw(name: str, shape: torch.Size, seed: int, device: str = "cpu") -> torch.Tensor:
    """bf16 values of one tensor (on the CPU): RMSNorm gains 1, biases 0, the rest N(0, STD),
    drawn on `device` (a GPU draws the 3.8B values in seconds, the CPU in minutes)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    g = torch.Generator(device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * STD).to(torch.bfloat16).cpu()


def write_safetensors_streaming(path: Path, shapes: dict[str, torch.Size], device: str = "cpu") -> int:
    """A bf16 safetensors file written one tensor at a time; returns its size in bytes."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = shape.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the buffer starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for i, (name, shape) in enumerate(shapes.items()):
            f.write(draw(name, shape, seed=i, device=device).view(torch.int16).numpy().tobytes())
    return path.stat().st_size


def write_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SDXL_VAE).save_pretrained(folder, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--layers", type=int, default=None, help="fewer layers (tests); default: the release's 32")
    p.add_argument("--no-vae", action="store_true", help="skip vae/ (tests)")
    p.add_argument("--device", default="cpu", help="where the values are drawn (cuda: seconds)")
    args = p.parse_args(argv)
    from _release import write_tokenizer

    args.folder.mkdir(parents=True, exist_ok=True)
    phi3 = json.loads(RELEASE_CONFIG.read_text())
    if args.layers is not None:
        phi3["num_hidden_layers"] = args.layers
    t0 = time.perf_counter()
    shapes = original_shapes(phi3)
    size = write_safetensors_streaming(args.folder / "model.safetensors", shapes, args.device)
    (args.folder / "config.json").write_text(json.dumps(phi3, indent=2))
    write_tokenizer(args.folder)
    if not args.no_vae:
        write_vae(args.folder / "vae")
    params = sum(s.numel() for s in shapes.values())
    print(f"wrote {args.folder}: {len(shapes)} tensors, {params / 1e9:.3f}B parameters, "
          f"model.safetensors {size / 1e9:.2f} GB bf16, in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
