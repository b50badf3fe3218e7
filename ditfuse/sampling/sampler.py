"""Euler sampling with dual classifier-free guidance and an exact KV cache (no Lightning).

v = v_u + s_img * (v_img - v_u) + s_txt * (v_c - v_img)   (OmniGen / InstructPix2Pix dual CFG)
  = s_txt * v_c + (s_img - s_txt) * v_img + (1 - s_img) * v_u
where v_c sees text + images, v_img images only (OmniGen's image-CFG prompt), v_u no images and
OmniGen's default negative prompt (`negative_prompt`). Branches with zero weight are not run
(s_txt = s_img = 1 runs only v_c). Every row picks its own RoPE factors (ditfuse.model.backbone), so
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

Fewer evaluations (issue 18; off by default, so the default is today's Euler loop bit for bit):
`solver` / `schedule` (ditfuse.sampling.solvers), `guidance_interval` = [t_lo, t_hi]: the guidance
branches run only for t inside it, the conditional branch alone outside (Kynkaanniemi et al.,
NeurIPS 2024, "Applying guidance in a limited interval"), and `cache_threshold`: step caching
(TeaCache, Liu et al. 2024 / FORA): skip the blocks while the accumulated relative L1 change of
their input since the last full evaluation stays below the threshold, reusing that evaluation's
residual (blocks' output - input). OmniGen's blocks have no adaLN, so "the modulated input" is
the blocks' input itself (time token + output tokens). `preset="fast"` sets all of them
(FAST_PRESET, chosen by benchmarks/nfe_quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

from ditfuse.model.conditioning import NEGATIVE_PROMPT, build_conditioning, image_only_prompt
from ditfuse.sampling import solvers
from ditfuse.sampling.flow import timesteps
from ditfuse.sampling.solvers import SCHEDULES, SOLVERS, solve, time_grid

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
    solver: str = "euler"  # ditfuse.sampling.solvers.SOLVERS
    schedule: Literal["uniform", "shifted"] = "uniform"  # uniform = OmniGen's grid
    shift: float = 1.0  # with schedule "shifted": t' = t / (t + shift (1 - t))
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # [t_lo, t_hi]: always
    cache_threshold: float | None = None  # step caching: None = off; 0 never skips
    preset: str | None = None  # "fast": FAST_PRESET's settings replace the ones above (then None)

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"unknown sampler preset {self.preset!r}: use one of {', '.join(PRESETS)}")
            for key, value in PRESETS[self.preset].items():
                setattr(self, key, value)
            self.preset = None  # expanded: replace() of a copy keeps the values, not the name
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if self.noise not in ("cpu", "device"):
            raise ValueError(f"sampler noise must be 'cpu' or 'device', got {self.noise!r}")
        if self.state not in ("float32", "model"):
            raise ValueError(f"sampler state must be 'float32' or 'model', got {self.state!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown sampler solver {self.solver!r}: use one of {', '.join(SOLVERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown sampler schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.shift <= 0:
            raise ValueError(f"sampler shift must be > 0, got {self.shift}")
        self.guidance_interval = gi = [float(v) for v in self.guidance_interval]
        if len(gi) != 2 or not 0.0 <= gi[0] <= gi[1] <= 1.0:
            raise ValueError(f"sampler guidance_interval must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1, "
                             f"got {list(self.guidance_interval)}")
        if self.cache_threshold is not None and self.cache_threshold < 0:
            raise ValueError(f"sampler cache_threshold must be >= 0 (or null: off), got {self.cache_threshold}")
        if self.cache_threshold is not None and not self.kv_cache:
            raise ValueError("sampler cache_threshold needs kv_cache: true (it skips the cached step's blocks)")
        if self.state == "model" and not self.is_plain_euler:
            raise ValueError("sampler state 'model' (--official) is the original's Euler loop: use solver euler, "
                             "schedule uniform, guidance_interval [0, 1] and no cache_threshold with it")

    @property
    def is_plain_euler(self) -> bool:
        """Today's sampler: Euler on OmniGen's grid, guidance at every step, no step caching."""
        return (self.solver == "euler" and self.schedule == "uniform" and self.guidance_interval == [0.0, 1.0]
                and self.cache_threshold is None)


# `sampler.preset: fast` / `ditfuse fuse --fast`: chosen by benchmarks/nfe_quality.py on the trained
# demo model (docs/performance.md, "Fewer evaluations"); guidance scales and seed stay the user's.
FAST_PRESET: dict = {"solver": "dpm++2m", "steps": 16, "schedule": "uniform", "shift": 1.0,
                     "guidance_interval": [0.0, 1.0], "cache_threshold": None}
PRESETS: dict[str, dict] = {"fast": FAST_PRESET}


def euler(velocity: VelocityFn, x0: Tensor, steps: int, state_dtype: torch.dtype | None = None) -> Tensor:
    """Integrate dx/dt = v(x, t) from t=0 (noise) to t=1 (data) on linspace(0, 1, N+1).

    `state_dtype=None` keeps x in float32; a dtype casts x and t to it and steps by the float32
    difference of the grid, as OmniGenScheduler does (bf16 state under the official pipeline).
    """
    ts = timesteps(steps)
    if state_dtype is None:
        return solvers.euler(velocity, x0, ts)
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


class StepCache:
    """Step caching (TeaCache / FORA) of `Backbone.step`: one state per KV-cache key.

    A call embeds the blocks' input h (B, 1+N, D) and adds its relative L1 change since the
    previous call, mean|h - h_prev| / mean|h_prev|, to a running sum. While the sum stays below
    `threshold` the blocks are skipped: output head of h + the residual (blocks' output - input)
    of the last full evaluation. Otherwise the blocks run, the residual is stored and the sum
    resets. TeaCache's per-model polynomial rescaling of the distance is left out (it is fitted to
    each model; the threshold plays its role). threshold 0 never skips: the full step, bit for bit.
    """

    def __init__(self, backbone, threshold: float) -> None:
        self.backbone, self.threshold = backbone, threshold
        self.key: str | None = None
        self.last: Tensor | None = None  # previous call's blocks' input
        self.residual: Tensor | None = None
        self.distance = 0.0

    def __call__(self, key: str, x: Tensor, t: Tensor, cache) -> tuple[Tensor, bool]:
        """(velocity, whether the blocks ran)."""
        bb = self.backbone
        h, temb = bb.step_input(x, t)
        if key != self.key:  # other rows (guidance switched on/off): the residual does not apply
            self.key, self.last, self.residual = key, None, None
        if self.last is not None:
            self.distance += float((h - self.last).abs().mean() / self.last.abs().mean())
        self.last = h
        if self.residual is not None and self.distance < self.threshold:
            return bb.step_output(h + self.residual, temb, *x.shape[-2:]), False
        out = bb.step_blocks(h, cache)
        self.residual, self.distance = out - h, 0.0
        return bb.step_output(out, temb, *x.shape[-2:]), True


class GuidedVelocity:
    """Dual-CFG velocity of a `Backbone` for a batch of prompts and conditioning latents.

    cond_latents: (B, K, c, h, w) latents of the K input images of each row (None if K = 0);
    out_hw: the output latent size (h_out, w_out). `guidance_interval` [t_lo, t_hi]: outside it
    only the conditional branch runs and is the velocity; `cache_threshold`: StepCache (needs
    kv_cache). `evaluations` counts transformer evaluations of one branch of one image (NFE).
    """

    def __init__(self, backbone, tokenizer, prompts: list[str], cond_latents: Tensor | None,
                 out_hw: tuple[int, int], guidance_scale: float = 2.5, img_guidance_scale: float = 1.6,
                 kv_cache: bool = True, batch_branches: bool = True, negative_prompt: str = NEGATIVE_PROMPT,
                 model_dtype_guidance: bool = False, guidance_interval: list[float] | None = None,
                 cache_threshold: float | None = None) -> None:
        self.backbone, self.kv_cache, self.batched = backbone, kv_cache, batch_branches
        self.scales = (guidance_scale, img_guidance_scale)
        self.model_dtype_guidance = model_dtype_guidance
        B = self.B = len(prompts)
        K = 0 if cond_latents is None else cond_latents.shape[1]
        p = backbone.patch_size
        n = 0 if cond_latents is None else (cond_latents.shape[-2] // p) * (cond_latents.shape[-1] // p)
        N = (out_hw[0] // p) * (out_hw[1] // p)
        self.cond_latents = cond_latents
        self.weights = branch_weights(guidance_scale, img_guidance_scale)
        names = list(self.weights)
        interval = None if guidance_interval is None or list(guidance_interval) == [0.0, 1.0] else guidance_interval
        self.interval = None if names == ["c"] else interval  # no guidance: nothing to switch off
        if self.interval is not None and names[0] != "c":
            raise ValueError("a sampler guidance_interval needs the conditional branch: guidance_scale != 0")
        branch_prompts = {"c": (list(prompts), K), "img": ([image_only_prompt(K)] * B, K),
                          "u": ([negative_prompt] * B, 0)}
        device = backbone.transformer.device
        build = lambda ps, ks, rows: build_conditioning(  # noqa: E731
            tokenizer, ps, ks, tokens_per_image=n, num_output_tokens=N, image_rows=rows, device=device)
        if batch_branches:
            ps = [q for name in names for q in branch_prompts[name][0]]
            ks = [branch_prompts[name][1] for name in names for _ in range(B)]
            self.conds = {"all": build(ps, ks, list(range(B)) * len(names))}
            if self.interval is not None and not kv_cache:  # the conditional rows alone, uncached
                self.conds["c"] = build(*branch_prompts["c"], None)
        else:
            self.conds = {name: build(branch_prompts[name][0], branch_prompts[name][1], None) for name in names}
        self.caches = ({k: backbone.prefill(c, cond_latents) for k, c in self.conds.items()} if kv_cache else None)
        if self.caches is not None and self.interval is not None and batch_branches:
            self.caches["c"] = self.caches["all"].rows(B)  # the "c" rows come first in "all"
        self.names = names
        self.step_cache = None if cache_threshold is None else StepCache(backbone, cache_threshold)
        self.evaluations = 0  # blocks run, per image and branch

    def _run(self, key: str, x: Tensor, t: Tensor) -> Tensor:
        ran = True
        if self.caches is None:
            v = self.backbone(x, t, self.conds[key], self.cond_latents)
        elif self.step_cache is None:
            v = self.backbone.step(x, t, self.caches[key])
        else:
            v, ran = self.step_cache(key, x, t, self.caches[key])
        self.evaluations += ran * x.shape[0] // self.B
        return v

    def _guided(self, t: Tensor) -> bool:
        if self.interval is None:
            return True
        return self.interval[0] <= float(t[0]) <= self.interval[1]

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if not self._guided(t):  # conditional branch only: the unguided velocity
            return self._run("c", x, t).float()
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
                   seeds: list[int] | None = None, stats: dict | None = None) -> Tensor:
    """Latents (B, c, h, w) sampled for `prompts` given (B, K, c, h, w) condition latents.
    `seeds` (one per row) override `settings.seed`; a `stats` dict gets "evaluations" (NFE per image)."""
    s = settings or SamplerSettings()
    device = backbone.transformer.device
    velocity = GuidedVelocity(backbone, tokenizer, prompts, cond_latents, out_shape[-2:], s.guidance_scale,
                              s.img_guidance_scale, kv_cache=s.kv_cache, batch_branches=s.batch_branches,
                              negative_prompt=s.negative_prompt, model_dtype_guidance=s.state == "model",
                              guidance_interval=s.guidance_interval, cache_threshold=s.cache_threshold)
    x0 = initial_noise((len(prompts), *out_shape), s.seed if seeds is None else seeds, device,
                       on_device=s.noise == "device")
    if s.is_plain_euler:  # today's sampler, unchanged (the --official parity rests on it)
        state_dtype = backbone.transformer.dtype if s.state == "model" else None
        out = euler(velocity, x0, s.steps, state_dtype).float()
    else:
        out = solve(velocity, x0, time_grid(s.steps, s.schedule, s.shift), s.solver)
    if stats is not None:
        stats["evaluations"] = velocity.evaluations
    return out
