"""Euler sampling with dual classifier-free guidance and an exact KV cache (no Lightning).

v = v_u + s_img * (v_img - v_u) + s_txt * (v_c - v_img)   (OmniGen / InstructPix2Pix dual CFG)
  = s_txt * v_c + (s_img - s_txt) * v_img + (1 - s_img) * v_u
where v_c sees text + images, v_img images only (OmniGen's image-CFG prompt), v_u no images and
OmniGen's default negative prompt (`negative_prompt`). Branches with zero weight are not run
(s_txt = s_img = 1 runs only v_c). Every row picks its own RoPE factors (ditfuse.backbone), so
batched branches give what running them one by one gives.

Two settings reproduce the official pipeline's numerics (`ditfuse fuse --official`):
`noise="device"` draws x0 on the compute device's generator (OmniGenPipeline.__call__:
`torch.randn(..., device=device, generator=torch.Generator(device).manual_seed(seed))`), and
`state="model"` keeps the Euler state, the timesteps and the guidance combination in the model
dtype (OmniGenScheduler: `z = z + (sigma_next - sigma) * pred` with z in bf16).

KV cache: condition tokens never attend to t-dependent tokens, so their per-layer K/V are
computed once per branch (`Backbone.prefill`) and every Euler step runs only the time token and
the output tokens (`Backbone.step`). Branches run batched in one call (fast) or one after another
(less memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from ditfuse.conditioning import NEGATIVE_PROMPT, build_conditioning, image_only_prompt
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
    negative_prompt: str = NEGATIVE_PROMPT  # text of the unconditional branch (no images)
    noise: Literal["cpu", "device"] = "cpu"  # where x0 is drawn: cpu = the same on every device
    state: Literal["float32", "model"] = "float32"  # dtype of the Euler state (model: the original's)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if self.noise not in ("cpu", "device"):
            raise ValueError(f"sampler noise must be 'cpu' or 'device', got {self.noise!r}")
        if self.state not in ("float32", "model"):
            raise ValueError(f"sampler state must be 'float32' or 'model', got {self.state!r}")


def euler(velocity: VelocityFn, x0: Tensor, steps: int, state_dtype: torch.dtype | None = None) -> Tensor:
    """Integrate dx/dt = v(x, t) from t=0 (noise) to t=1 (data) on linspace(0, 1, N+1).

    `state_dtype=None` keeps x in float32; a dtype casts x and t to it and steps by the float32
    difference of the grid, as OmniGenScheduler does (bf16 state under the official pipeline).
    """
    ts = timesteps(steps)
    if state_dtype is None:
        ts_list = ts.tolist()
        x = x0
        for t_cur, t_next in zip(ts_list[:-1], ts_list[1:]):
            t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.float32)
            x = x + (t_next - t_cur) * velocity(x, t).float()
        return x
    x = x0.to(state_dtype)
    for i in range(steps):
        t = (torch.zeros(x.shape[0]) + ts[i]).to(x.device, state_dtype)
        x = x + (ts[i + 1] - ts[i]) * velocity(x, t).to(state_dtype)
    return x


def initial_noise(shape: tuple[int, ...], seed: int | list[int], device: torch.device | str,
                  on_device: bool = False) -> Tensor:
    """Seeded x0 ~ N(0, I) of `shape` (B, ...), float32, one generator per row.

    Row b uses `seed[b]` (an int seed serves every row), so a row's noise never depends on which
    other rows share its batch. Drawn on the CPU (the same numbers on every device) unless
    `on_device`: then on `device`'s own generator, as OmniGen's pipeline draws it (a CUDA
    generator gives other numbers than the CPU one for the same seed).
    """
    seeds = [int(seed)] * shape[0] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    where = torch.device(device) if on_device else torch.device("cpu")
    rows = [torch.randn(shape[1:], generator=torch.Generator(where).manual_seed(s), device=where,
                        dtype=torch.float32) for s in seeds]
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
                 kv_cache: bool = True, batch_branches: bool = True, negative_prompt: str = NEGATIVE_PROMPT,
                 model_dtype_guidance: bool = False) -> None:
        self.backbone, self.kv_cache, self.batched = backbone, kv_cache, batch_branches
        self.scales = (guidance_scale, img_guidance_scale)
        self.model_dtype_guidance = model_dtype_guidance
        B = len(prompts)
        K = 0 if cond_latents is None else cond_latents.shape[1]
        p = backbone.patch_size
        n = 0 if cond_latents is None else (cond_latents.shape[-2] // p) * (cond_latents.shape[-1] // p)
        N = (out_hw[0] // p) * (out_hw[1] // p)
        self.cond_latents = cond_latents
        self.weights = branch_weights(guidance_scale, img_guidance_scale)
        branch_prompts = {"c": (list(prompts), K), "img": ([image_only_prompt(K)] * B, K),
                          "u": ([negative_prompt] * B, 0)}
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
            v_all = self._run("all", x.repeat(nb, 1, 1, 1), t.repeat(nb))
            vs = dict(zip(self.names, v_all.chunk(nb)))
        else:
            vs = {name: self._run(name, x, t) for name in self.names}
        if self.model_dtype_guidance and set(vs) == {"c", "img", "u"}:
            # OmniGen's forward_with_separate_cfg, term by term in the model dtype
            s_txt, s_img = self.scales
            return vs["u"] + s_img * (vs["img"] - vs["u"]) + s_txt * (vs["c"] - vs["img"])
        return sum(w * vs[name].float() for name, w in self.weights.items())


@torch.no_grad()
def sample_latents(backbone, tokenizer, prompts: list[str], cond_latents: Tensor | None,
                   out_shape: tuple[int, int, int], settings: SamplerSettings | None = None,
                   seeds: list[int] | None = None) -> Tensor:
    """Latents (B, c, h, w) sampled for `prompts` given (B, K, c, h, w) condition latents.
    `seeds` (one per row) override `settings.seed`."""
    s = settings or SamplerSettings()
    device = backbone.transformer.device
    velocity = GuidedVelocity(backbone, tokenizer, prompts, cond_latents, out_shape[-2:], s.guidance_scale,
                              s.img_guidance_scale, kv_cache=s.kv_cache, batch_branches=s.batch_branches,
                              negative_prompt=s.negative_prompt, model_dtype_guidance=s.state == "model")
    x0 = initial_noise((len(prompts), *out_shape), s.seed if seeds is None else seeds, device,
                       on_device=s.noise == "device")
    state_dtype = backbone.transformer.dtype if s.state == "model" else None
    return euler(velocity, x0, s.steps, state_dtype).float()
