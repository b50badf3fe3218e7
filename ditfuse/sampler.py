"""Euler sampling with dual classifier-free guidance and an exact KV cache (no Lightning).

v = v_u + s_img * (v_img - v_u) + s_txt * (v_c - v_img)   (OmniGen / InstructPix2Pix dual CFG)
  = s_txt * v_c + (s_img - s_txt) * v_img + (1 - s_img) * v_u
where v_c sees text + images, v_img images only (OmniGen's image-CFG prompt), v_u neither.
Branches with zero weight are not run (s_txt = s_img = 1 runs only v_c).

KV cache: condition tokens never attend to t-dependent tokens, so their per-layer K/V are
computed once per branch (`Backbone.prefill`) and every Euler step runs only the time token and
the output tokens (`Backbone.step`). Branches run batched in one call (fast) or one after another
(less memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ditfuse.conditioning import UNCOND_PROMPT, build_conditioning, image_only_prompt
from ditfuse.flow import timesteps

VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SamplerSettings:
    steps: int = 50  # docs/DESIGN.md / OmniGen default
    guidance_scale: float = 2.5  # s_txt; OmniGen pipeline default
    img_guidance_scale: float = 1.6  # s_img; OmniGen pipeline default
    kv_cache: bool = True
    batch_branches: bool = True
    seed: int = 0  # initial noise seed of every row (see initial_noise)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")


def euler(velocity: VelocityFn, x0: Tensor, steps: int) -> Tensor:
    """Integrate dx/dt = v(x, t) from t=0 (noise) to t=1 (data) on linspace(0, 1, N+1)."""
    ts = timesteps(steps).tolist()
    x = x0
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.float32)
        x = x + (t_next - t_cur) * velocity(x, t).float()
    return x


def initial_noise(shape: tuple[int, ...], seed: int | list[int], device: torch.device | str) -> Tensor:
    """Seeded x0 ~ N(0, I) of `shape` (B, ...), one generator per row, drawn on the CPU.

    Row b uses `seed[b]` (an int seed serves every row), so a row's noise depends neither on the
    device nor on which other rows share its batch.
    """
    seeds = [int(seed)] * shape[0] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    rows = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(s), dtype=torch.float32) for s in seeds]
    return torch.stack(rows).to(device)


def branch_weights(guidance_scale: float, img_guidance_scale: float) -> dict[str, float]:
    w = {"c": guidance_scale, "img": img_guidance_scale - guidance_scale, "u": 1.0 - img_guidance_scale}
    return {k: v for k, v in w.items() if v != 0.0}


class GuidedVelocity:
    """Dual-CFG velocity of a `Backbone` for a batch of prompts and conditioning latents.

    cond_latents: (B, K, c, h, w) latents of the K input images of each row (None if K = 0);
    out_hw: the output latent size (h_out, w_out).
    """

    def __init__(self, backbone, tokenizer, prompts: list[str], cond_latents: Tensor | None,
                 out_hw: tuple[int, int], guidance_scale: float = 2.5, img_guidance_scale: float = 1.6,
                 kv_cache: bool = True, batch_branches: bool = True) -> None:
        self.backbone, self.kv_cache, self.batched = backbone, kv_cache, batch_branches
        B = len(prompts)
        K = 0 if cond_latents is None else cond_latents.shape[1]
        p = backbone.patch_size
        n = 0 if cond_latents is None else (cond_latents.shape[-2] // p) * (cond_latents.shape[-1] // p)
        N = (out_hw[0] // p) * (out_hw[1] // p)
        self.cond_latents = cond_latents
        self.weights = branch_weights(guidance_scale, img_guidance_scale)
        branch_prompts = {"c": (list(prompts), K), "img": ([image_only_prompt(K)] * B, K),
                          "u": ([UNCOND_PROMPT] * B, 0)}
        device = backbone.transformer.device
        build = lambda ps, ks, rows: build_conditioning(  # noqa: E731
            tokenizer, ps, ks, tokens_per_image=n, num_output_tokens=N, image_rows=rows, device=device)
        names = list(self.weights)
        if batch_branches:
            ps = [q for name in names for q in branch_prompts[name][0]]
            ks = [branch_prompts[name][1] for name in names for _ in range(B)]
            self.conds = {"all": build(ps, ks, list(range(B)) * len(names))}
        else:
            self.conds = {name: build(branch_prompts[name][0], branch_prompts[name][1], None) for name in names}
        self.caches = ({k: backbone.prefill(c, cond_latents) for k, c in self.conds.items()} if kv_cache else None)
        self.names = names

    def _run(self, key: str, x: Tensor, t: Tensor) -> Tensor:
        if self.caches is not None:
            return self.backbone.step(x, t, self.caches[key])
        return self.backbone(x, t, self.conds[key], self.cond_latents)

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.batched:
            nb = len(self.names)
            v_all = self._run("all", x.repeat(nb, 1, 1, 1), t.repeat(nb)).float()
            vs = dict(zip(self.names, v_all.chunk(nb)))
        else:
            vs = {name: self._run(name, x, t).float() for name in self.names}
        return sum(w * vs[name] for name, w in self.weights.items())


@torch.no_grad()
def sample_latents(backbone, tokenizer, prompts: list[str], cond_latents: Tensor | None,
                   out_shape: tuple[int, int, int], settings: SamplerSettings | None = None,
                   seeds: list[int] | None = None) -> Tensor:
    """Latents (B, c, h, w) sampled for `prompts` given (B, K, c, h, w) condition latents.
    `seeds` (one per row) override `settings.seed`."""
    s = settings or SamplerSettings()
    device = backbone.transformer.device
    velocity = GuidedVelocity(backbone, tokenizer, prompts, cond_latents, out_shape[-2:], s.guidance_scale,
                              s.img_guidance_scale, kv_cache=s.kv_cache, batch_branches=s.batch_branches)
    x0 = initial_noise((len(prompts), *out_shape), s.seed if seeds is None else seeds, device)
    return euler(velocity, x0, s.steps)
