"""Tiny random stand-ins for the CLIPIQA and MANIQA weight files, laid out like pyiqa's cache.

The files go through exactly the code path the real ones do (see ../shared/docs/METRICS.md):
- `clip/RN50.pt`: a small `pyiqa.archs.clip_model.CLIP` (ResNet image tower, like RN50) traced to
  TorchScript, as OpenAI ships it. Context length 77 and vocab 49408 are fixed by `clip.tokenize`;
  `build_model` derives text heads as width // 64, so the text width is 64.
- `pyiqa/CLIP-IQA+_learned_prompts-603f3273.pth`: the learned prompt context, (2, 16, 64).
- `pyiqa/ckpt_koniq10k.pt`: a MANIQA state dict with a small ViT (embed_dim 64, depth 10, since
  MANIQA hooks blocks 6-9) and small MANIQA dims; `ditfuse.eval.iqa` reads the sizes off the tensors.

Reused by the callback tests: `make_tiny_iqa_weights(tmp_path)` then
`build_iqa_metrics(weights_dir=tmp_path, maniqa_crops=1)`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

CLIP_FILE = "clip/RN50.pt"
CLIPIQA_PLUS_FILE = "pyiqa/CLIP-IQA+_learned_prompts-603f3273.pth"
MANIQA_FILE = "pyiqa/ckpt_koniq10k.pt"

TINY_VIT = dict(embed_dim=64, depth=10, num_heads=1, mlp_ratio=1.0, num_classes=0)
TINY_MANIQA = dict(embed_dim=64, dim_mlp=64, depths=[1, 1], num_heads=[2, 2], window_size=4,
                   num_tab=1, scale=0.8)


def make_tiny_iqa_weights(root: str | Path, seed: int = 0) -> Path:
    """Write tiny random stand-ins under `root` (a torch hub dir layout) and return `root`."""
    root = Path(root)
    (root / "clip").mkdir(parents=True, exist_ok=True)
    (root / "pyiqa").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _write_tiny_clip(root / CLIP_FILE)
    torch.save(torch.randn(2, 16, 64) * 0.02, root / CLIPIQA_PLUS_FILE)
    torch.save(_tiny_maniqa_state(), root / MANIQA_FILE)
    return root


def _write_tiny_clip(path: Path) -> None:
    from pyiqa.archs.clip_model import CLIP

    model = CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                 vision_patch_size=None, context_length=77, vocab_size=49408,
                 transformer_width=64, transformer_heads=1, transformer_layers=1).eval()
    image = torch.rand(1, 3, 64, 64)  # (N, 3, H, W)
    text = torch.randint(1, 49407, (2, 77))  # (prompts, context)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the jit deprecation notice
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    traced.save(str(path))


def _tiny_maniqa_state() -> dict[str, torch.Tensor]:
    import timm
    from pyiqa.archs import maniqa_arch

    class _TinyTimm:  # stands in for the module inside maniqa_arch while it builds its ViT
        def __getattr__(self, name):
            return getattr(timm, name)

        @staticmethod
        def create_model(name, pretrained=False, **kwargs):
            return timm.create_model(name, pretrained=False, **{**kwargs, **TINY_VIT})

    saved = maniqa_arch.timm
    maniqa_arch.timm = _TinyTimm()
    try:
        net = maniqa_arch.MANIQA(pretrained=False, **TINY_MANIQA)
    finally:
        maniqa_arch.timm = saved
    # The final ReLU of fc_score zeroes half of random heads' outputs; lift the bias so the
    # stand-in's score still moves with the input.
    with torch.no_grad():
        net.fc_score[3].bias.fill_(1.0)
    return net.state_dict()
