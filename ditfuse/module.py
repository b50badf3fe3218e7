"""`DiTFuseModule`: the OmniGen DiT (+ LoRA) trained by flow matching, as a LightningModule.

Init arguments are what a YAML config sets (see configs/demo.yaml, configs/omnigen_lora.yaml).
The batch is the contract of docs/CONTRACTS.md: prompts (strings), two input images and a
target, all in [-1, 1]; tokenization and OmniGen conditioning happen here (cheap, and the data
stack stays model-agnostic).

Checkpoints: a LoRA run keeps only the trainable tensors (+ optimizer / scheduler state, which
Lightning adds); loading rebuilds the base from `preset` / `pretrained` and lays them on top.
A full fine-tune (lora=None, the tiny demo) keeps the whole transformer. Codecs never enter a
checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from ditfuse.core.prompts import TASKS
from ditfuse.model.backbone import Backbone, build_transformer, load_transformer
from ditfuse.model.codec import build_codec
from ditfuse.model.conditioning import DROP_ALL_PROMPT, build_conditioning, image_only_prompt
from ditfuse.model.config import ModelConfig
from ditfuse.model.lora import LoraSettings, add_lora, count_parameters, save_adapter
from ditfuse.model.tokenizer import load_tokenizer
from ditfuse.sampling import flow as F
from ditfuse.sampling.sampler import SamplerSettings, sample_latents

NUM_INPUT_IMAGES = 2  # DiTFuse prompts reference <|image_1|> and <|image_2|>


@dataclass
class OptimizerSettings:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warmup
    total_steps: int | None = None  # None: the trainer's estimated stepping batches
    min_lr_ratio: float = 0.0  # floor of cosine/linear decay, as a fraction of lr

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"optimizer.schedule must be constant|cosine|linear, got {self.schedule!r}")
        self.betas = tuple(self.betas)


@dataclass
class FlowSettings:
    t_sampler: Literal["logit_normal", "uniform", "shifted"] = "logit_normal"  # OmniGen / SD3
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0
    # condition dropout for dual CFG (InstructPix2Pix uses 5% + 5%; OmniGen drops conditions ~10%)
    p_text: float = 0.05  # drop text, keep images -> trains v_img
    p_all: float = 0.05  # drop text and images -> trains v_u
    drop_all_prompt: str = DROP_ALL_PROMPT  # a drop-all row's text, no images (official training: <cfg>)

    def __post_init__(self) -> None:
        if self.t_sampler not in F.TIME_SAMPLERS:
            raise ValueError(f"flow.t_sampler must be one of {', '.join(F.TIME_SAMPLERS)}, got {self.t_sampler!r}")
        if not (0 <= self.p_text and 0 <= self.p_all and self.p_text + self.p_all <= 1):
            raise ValueError(f"flow.p_text and flow.p_all must be >= 0 with a sum <= 1, got {self.p_text}, {self.p_all}")


class WarmupSchedule:
    """LR multiplier: linear warmup, then constant / cosine / linear decay to `min_ratio`."""

    def __init__(self, warmup: int, total: int, kind: str, min_ratio: float) -> None:
        self.warmup, self.total, self.kind, self.min_ratio = warmup, max(total, 1), kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if self.kind == "cosine" else 1.0 - frac
        return self.min_ratio + (1 - self.min_ratio) * decay


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample PSNR (dB) of images in [-1, 1], measured on [0, 1]."""
    a = ((pred.float().clamp(-1, 1) + 1) / 2).flatten(1)
    b = ((target.float().clamp(-1, 1) + 1) / 2).flatten(1)
    mse = (a - b).pow(2).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def sample_seed(base: int, *parts: str) -> int:
    """A stable 63-bit seed from a base seed and strings (a validation sample's task and key): a
    sample draws the same noise whichever rank, batch or position it lands in."""
    digest = hashlib.blake2b("/".join((str(base), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def val_metric_names(tasks: tuple[str, ...] = TASKS) -> list[str]:
    """Every key validation may log, in one fixed order (the same list on every rank)."""
    return (["val/loss", "val/psnr"] + [f"val/loss/{t}" for t in tasks] + [f"val/{t}/psnr" for t in tasks]
            + ["val/m3/psnr_mean"])


class GlobalMeans:
    """Per-sample values under fixed metric names, merged over all ranks once per epoch.

    Each value is kept under (name, sample id). The epoch-end merge is one all_gather on every rank
    whatever tasks a rank saw (no per-key collective that a rank could miss), and merging by sample
    id drops the copies of batches Lightning's distributed sampler repeats to give every rank as
    many batches. A mean is then over the distinct samples of the whole validation set: the same
    for any world size, batch size and order. A name no rank saw is not logged.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.values: dict[tuple[str, str], float] = {}

    def reset(self, device: torch.device | None = None) -> None:
        self.values = {}

    def add(self, name: str, values: Tensor, ids: list[str]) -> None:
        if name not in self.names:
            raise KeyError(f"{name} is not among the validation metrics {self.names}")
        for sample, v in zip(ids, values.detach().double().flatten().cpu().tolist(), strict=True):
            self.values[(name, sample)] = v

    def reduce(self) -> dict[str, float]:
        parts = [self.values]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, self.values)
        merged = {k: v for part in parts for k, v in part.items()}
        sums, counts = dict.fromkeys(self.names, 0.0), dict.fromkeys(self.names, 0)
        for (name, _), v in sorted(merged.items()):  # one summation order on every rank
            sums[name] += v
            counts[name] += 1
        return {n: sums[n] / counts[n] for n in self.names if counts[n]}


class DiTFuseModule(pl.LightningModule):
    """OmniGen DiT + optional LoRA, flow matching, dual-CFG sampling.

    Args:
        preset: model preset (`tiny`, `omnigen-v1`): shape for random init, codec, tokenizer kind.
        pretrained: local OmniGen folder (diffusers layout or original OmniGen-v1 layout); None:
            random init of the preset.
        vae_path: SDXL VAE folder for the VAE codec (default: `pretrained`/vae).
        tokenizer: 'builtin' or a local tokenizer folder (default: builtin for tiny, else `pretrained`).
        model_overrides: preset fields to change for random init (e.g. {num_layers: 2}).
        lora: LoRA settings; None trains all weights (the tiny demo).
        optimizer, flow, val_sampler: see the dataclasses above and ditfuse.sampling.sampler.SamplerSettings.
        gradient_checkpointing: recompute each block in backward (memory for time).
        base_dtype: 'bf16' | 'fp16' | None: store the frozen base weights in this dtype (LoRA only).
        seed: random init seed.
    """

    def __init__(
        self,
        preset: str = "tiny",
        pretrained: str | None = None,
        vae_path: str | None = None,
        tokenizer: str | None = None,
        model_overrides: dict[str, Any] | None = None,
        lora: LoraSettings | None = None,
        optimizer: OptimizerSettings = OptimizerSettings(),
        flow: FlowSettings = FlowSettings(),
        val_sampler: SamplerSettings = SamplerSettings(steps=20, guidance_scale=1.0, img_guidance_scale=1.0),
        gradient_checkpointing: bool = False,
        base_dtype: Literal["bf16", "fp16"] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # settings as plain dicts: checkpoints then load with torch.load(weights_only=True)
        for key in ("lora", "optimizer", "flow", "val_sampler"):
            if is_dataclass(self.hparams[key]):
                self.hparams[key] = asdict(self.hparams[key])
        self.preset = ModelConfig.from_name(preset, **(model_overrides or {}))
        self.lora_settings = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.optim = OptimizerSettings(**optimizer) if isinstance(optimizer, dict) else optimizer
        self.flow_settings = FlowSettings(**flow) if isinstance(flow, dict) else flow
        self.val_sampler = SamplerSettings(**val_sampler) if isinstance(val_sampler, dict) else val_sampler

        # 1. Transformer (+ LoRA)
        frozen = BASE_DTYPES[base_dtype] if self.lora_settings is not None and base_dtype else None
        if pretrained is not None:
            # straight into the frozen dtype: a bf16 release stays a view of its shared mmap (no
            # fp32 copy, one page-cache copy per node), a fp32 one is converted tensor by tensor
            transformer = load_transformer(pretrained, frozen)
        else:
            transformer = build_transformer(self.preset, seed=seed)
        if self.lora_settings is not None:
            if frozen is not None:
                transformer = transformer.to(frozen)
            # peft draws lora_A from torch's global generator: seed it, so every rank builds the same
            # adapter (FSDP does not broadcast rank 0's weights; DDP does, but only at wrap time)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                add_lora(transformer, self.lora_settings)
        elif base_dtype is not None:
            raise ValueError("model.base_dtype only applies to LoRA runs (set model.lora or drop base_dtype)")
        self.backbone = Backbone(transformer, gradient_checkpointing=gradient_checkpointing)
        self.patch_size = int(transformer.config.patch_size)

        # 2. Codec and tokenizer (never trained, never checkpointed)
        vae = vae_path or pretrained
        self.codec = build_codec(self.preset.codec, vae)
        self.codec.requires_grad_(False)
        tok = tokenizer or ("builtin" if self.preset.tokenizer == "builtin" else pretrained)
        if tok is None:
            raise ValueError(f"preset {preset!r} needs the checkpoint's tokenizer: set model.pretrained or model.tokenizer")
        self.tokenizer = load_tokenizer(tok)
        if self.tokenizer.vocab_size > transformer.config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} ids but the transformer's vocab_size is "
                             f"{transformer.config.vocab_size}: model.tokenizer does not match the model")
        # partial (trainable-only) checkpoints load with strict=False; on_load_checkpoint checks them
        self.strict_loading = False
        self._val_means = GlobalMeans(val_metric_names())

    # -----------------------------------------------------------------------------------------
    # Shapes and encoding
    # -----------------------------------------------------------------------------------------
    @property
    def pixels_per_token(self) -> int:
        return self.codec.downsample * self.patch_size

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, K, 3, H, W) in [-1, 1] -> (B, K, c, h, w) latents."""
        B, K, _, H, W = images.shape
        self.codec.check_size(H, W, self.pixels_per_token)
        with torch.no_grad():
            lat = self.codec.encode(images.flatten(0, 1).to(self.device))
        return lat.unflatten(0, (B, K)).float()

    # -----------------------------------------------------------------------------------------
    # Training
    # -----------------------------------------------------------------------------------------
    def _dropout_prompts(self, prompts: list[str]) -> tuple[list[str], list[int]]:
        fs = self.flow_settings
        drop_text, drop_all = F.condition_dropout(len(prompts), fs.p_text, fs.p_all)
        out, counts = [], []
        for p, dt, da in zip(prompts, drop_text.tolist(), drop_all.tolist()):
            if da:
                out.append(fs.drop_all_prompt)
                counts.append(0)
            else:
                out.append(image_only_prompt(NUM_INPUT_IMAGES) if dt else p)
                counts.append(NUM_INPUT_IMAGES)
        return out, counts

    def flow_loss(self, batch: dict[str, Any], dropout: bool = True,
                  generator: torch.Generator | None = None, seeds: list[int] | None = None) -> Tensor:
        """Per-sample flow-matching loss (B,) for a batch.

        t and x0 come from torch's global generator, from `generator`, or with `seeds` (one per
        row) from a generator per row, so a row's loss does not depend on its batch (validation)."""
        images, target = batch["images"], batch["target"]
        B = target.shape[0]
        # 1. Encode inputs and target
        cond_lat = self.encode_images(images)  # (B, 2, c, h, w)
        x1 = self.encode_images(target[:, None])[:, 0]  # (B, c, h, w)
        # 2. Conditioning (with dual-CFG dropout in training)
        prompts, counts = (self._dropout_prompts(list(batch["prompt"])) if dropout
                           else (list(batch["prompt"]), [NUM_INPUT_IMAGES] * B))
        p = self.patch_size
        n = (cond_lat.shape[-2] // p) * (cond_lat.shape[-1] // p)
        N = (x1.shape[-2] // p) * (x1.shape[-1] // p)
        cond = build_conditioning(self.tokenizer, prompts, counts, tokens_per_image=n, num_output_tokens=N,
                                  device=self.device)
        # 3. Flow matching: x_t = t x1 + (1 - t) x0, target x1 - x0
        t, x0 = self._draw_t_x0(x1, generator, seeds)
        v = self.backbone(F.interpolate(x0, x1, t), t, cond, cond_lat)
        return F.per_sample_mse(v, F.velocity_target(x0, x1))

    def _draw_t_x0(self, x1: Tensor, generator: torch.Generator | None,
                   seeds: list[int] | None) -> tuple[Tensor, Tensor]:
        fs = self.flow_settings
        kw = dict(kind=fs.t_sampler, mean=fs.t_mean, std=fs.t_std, shift=fs.t_shift)
        if seeds is not None:
            if len(seeds) != x1.shape[0]:
                raise ValueError(f"{len(seeds)} seeds for a batch of {x1.shape[0]}")
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            t = torch.cat([F.sample_t(1, generator=g, **kw) for g in gens])
            x0 = torch.stack([torch.randn(x1.shape[1:], generator=g) for g in gens])
            return t.to(self.device), x0.to(self.device, x1.dtype)
        t = F.sample_t(x1.shape[0], generator=generator, **kw).to(self.device)
        x0 = torch.randn(x1.shape, generator=generator).to(self.device) if generator is not None else torch.randn_like(x1)
        return t, x0

    def _log_per_task(self, prefix: str, values: Tensor, tasks: list[str], **kw) -> None:
        for task in sorted(set(tasks)):
            idx = [i for i, tk in enumerate(tasks) if tk == task]
            self.log(f"{prefix}/{task}", values[idx].mean(), batch_size=len(idx), **kw)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.flow_loss(batch)  # (B,)
        B = loss.shape[0]
        self.log("train/loss", loss.mean(), prog_bar=True, batch_size=B)
        self._log_per_task("train/loss", loss.detach(), list(batch["task"]))
        return loss.mean()

    # -----------------------------------------------------------------------------------------
    # Sampling and validation
    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: dict[str, Any] | None = None, *, prompts: list[str] | None = None,
               images: Tensor | None = None, steps: int | None = None, guidance_scale: float | None = None,
               img_guidance_scale: float | None = None, seed: int | list[int] | None = None,
               kv_cache: bool | None = None,
               batch_branches: bool | None = None, size: tuple[int, int] | None = None) -> Tensor:
        """Sample fused images (B, 3, H, W) in [-1, 1].

        Give a batch (its `prompt` and `images`) or `prompts` + `images` (B, K, 3, H, W) in
        [-1, 1]. Unset sampler options fall back to `val_sampler`. `seed` is one int for every
        row or one per row (a row's output then does not depend on its batch). The output has the
        inputs' size unless `size=(H, W)` is given (a multiple of `pixels_per_token`).
        """
        if batch is not None:
            prompts = list(batch["prompt"]) if prompts is None else prompts
            images = batch["images"] if images is None else images
        if prompts is None or images is None:
            raise ValueError("sample() needs a batch or both prompts and images")
        if images.dim() == 4:  # (B, 3, H, W): one input image
            images = images[:, None]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} image rows")
        base = self.val_sampler
        given = {"steps": steps, "guidance_scale": guidance_scale, "img_guidance_scale": img_guidance_scale,
                 "kv_cache": kv_cache, "batch_branches": batch_branches,
                 "seed": seed if isinstance(seed, int) else None}
        settings = replace(base, **{k: v for k, v in given.items() if v is not None})
        seeds = list(seed) if seed is not None and not isinstance(seed, int) else None
        H, W = size or images.shape[-2:]
        self.codec.check_size(H, W, self.pixels_per_token)
        cond_lat = self.encode_images(images)
        d = self.codec.downsample
        out_shape = (cond_lat.shape[2], H // d, W // d)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            lat = sample_latents(self.backbone, self.tokenizer, prompts, cond_lat, out_shape, settings, seeds)
        finally:
            self.backbone.train(was_training)
        return self.codec.decode(lat).float().clamp(-1, 1)

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy, self.backbone.gradient_checkpointing,
                       self.hparams["base_dtype"] if self.lora_settings is not None else None)

    def on_validation_epoch_start(self) -> None:
        self._val_means.reset(self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Accumulate per-sample values under fixed keys; `on_validation_epoch_end` logs the means.

        Noise (loss t/x0 and the sampler's initial noise) is seeded per sample from
        (val_sampler.seed, task, key): the values do not depend on the rank or batch a sample is in.
        """
        tasks = list(batch["task"])
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"validation batch has unknown tasks {unknown}; known: {', '.join(TASKS)}")
        ids = [(t, str(k)) for t, k in zip(tasks, batch["key"])]
        base = self.val_sampler.seed
        loss = self.flow_loss(batch, dropout=False, seeds=[sample_seed(base, "loss", *i) for i in ids])
        out = self.sample(batch, seed=[sample_seed(base, "sample", *i) for i in ids])
        target = batch["target"].to(out.device)
        score = psnr(out, target)
        acc = self._val_means
        names = [f"{t}/{k}" for t, k in ids]  # a sample's id: its task and key
        acc.add("val/loss", loss, names)
        acc.add("val/psnr", score, names)
        for task in sorted(set(tasks)):
            rows = [i for i, tk in enumerate(tasks) if tk == task]
            sub = [names[i] for i in rows]
            acc.add(f"val/loss/{task}", loss[rows], sub)
            acc.add(f"val/{task}/psnr", score[rows], sub)
        if "m3" in tasks:
            m3 = [i for i, t in enumerate(tasks) if t == "m3"]
            mean_in = batch["images"][m3].to(out.device).mean(dim=1)  # mean fusion of the two inputs
            acc.add("val/m3/psnr_mean", psnr(mean_in, target[m3]), [names[i] for i in m3])
        return {"output": out}

    def on_validation_epoch_end(self) -> None:
        # already global means, the same on every rank: no further sync
        for name, value in self._val_means.reduce().items():
            self.log(name, value, sync_dist=False)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0, dataloader_idx: int = 0) -> Tensor:
        """Fused images (B, 3, H, W) in [-1, 1] for a batch of `prompt` + `images` (datamodules/pairs.py).

        Sampled with `val_sampler`; row b's initial noise comes from `batch["seed"][b]` (default:
        val_sampler.seed), so an output does not depend on the rest of its batch (`ditfuse fuse`
        and `ditfuse predict` give the same image for a pair).
        """
        return self.sample(batch, seed=batch.get("seed") or None)

    # -----------------------------------------------------------------------------------------
    # Optimizer
    # -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        total = o.total_steps or int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupSchedule(o.warmup_steps, total, o.schedule, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -----------------------------------------------------------------------------------------
    # Checkpoints: trainable-only for LoRA runs, never the codec
    # -----------------------------------------------------------------------------------------
    def _checkpoint_keys(self) -> set[str]:
        if self.lora_settings is not None:
            return {n for n, p in self.named_parameters() if p.requires_grad}
        return {k for k in self.state_dict() if k.startswith("backbone.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not _is_sharded(checkpoint["state_dict"]):
            keep = self._checkpoint_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # else: a sharded (FSDP / ModelParallel) checkpoint keeps every key: Lightning resumes it by
        # loading the whole module's state dict from the shards, which fails on any absent key, and
        # each rank writes only its shard, so the frozen base costs disk, not a gather
        checkpoint["ditfuse"] = {"trainable_only": self.lora_settings is not None,
                                 "lora": None if self.lora_settings is None else asdict(self.lora_settings)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("ditfuse") or {}).get("lora") or {}
        if self.lora_settings is not None and saved.get("r") not in (None, self.lora_settings.r):
            raise ValueError(f"the checkpoint's LoRA has rank r={saved['r']} but model.lora.r is "
                             f"{self.lora_settings.r}; set model.lora.r={saved['r']} to resume it")
        if "state_dict" not in checkpoint:  # sharded: the strategy loaded the weights from the shards
            return
        missing = sorted(self._checkpoint_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors this model trains (e.g. {missing[:3]}); "
                           "was it written with the same model.preset / model.lora settings?")

    def save_adapter(self, folder: str | Path) -> Path:
        """The LoRA adapter alone (peft folder) for `ditfuse fuse --lora`."""
        if self.lora_settings is None:
            raise ValueError("this model has no LoRA adapter (model.lora is None)")
        return save_adapter(self.backbone.transformer, folder, self.lora_settings)

    def parameter_counts(self) -> tuple[int, int]:
        return count_parameters(self.backbone)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu", **overrides: Any
                        ) -> "DiTFuseModule":
        """Rebuild the model from its saved hyper-parameters (+ `overrides`, e.g. pretrained=...) and
        load the checkpoint's tensors on top (trainable-only for LoRA runs). `path` is a checkpoint
        file or the folder of a sharded FSDP checkpoint (consolidated in memory)."""
        if Path(path).is_dir():
            buffer = io.BytesIO()
            torch.save(load_checkpoint_dict(path), buffer)
            buffer.seek(0)
            return cls.load_from_checkpoint(buffer, map_location=map_location, strict=False, **overrides)
        return cls.load_from_checkpoint(str(path), map_location=map_location, strict=False, **overrides)


BASE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # model.base_dtype values


def check_strategy(strategy: Any, gradient_checkpointing: bool, base_dtype: str | None) -> None:
    """Settings that cannot work with the trainer's strategy, before any step runs."""
    name = type(strategy).__name__
    if gradient_checkpointing and getattr(strategy, "_activation_checkpointing_kwargs", None):
        raise ValueError(f"{name} checkpoints each block already (activation_checkpointing_policy): "
                         "set model.gradient_checkpointing=false, or drop the strategy's policy")
    if base_dtype is not None and name == "FSDPStrategy":
        raise ValueError(f"model.base_dtype={base_dtype} puts bf16/fp16 base weights and fp32 LoRA weights in one "
                         "FSDP unit, which FSDP1 cannot flatten: set model.base_dtype=null (bf16-mixed computes in bf16)")


def _is_sharded(state_dict: dict[str, Any]) -> bool:
    """True for FSDP's sharded state dicts (ShardedTensor / DTensor values)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) or type(v).__name__ == "ShardedTensor" for v in state_dict.values())


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict on the CPU: a .ckpt file, or the folder a sharded FSDP
    strategy wrote (state_dict_type: sharded), consolidated with Lightning's own converter."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if not (path / "meta.pt").is_file():
        raise FileNotFoundError(f"checkpoint {path} is neither a checkpoint file nor a sharded checkpoint folder "
                                "(with meta.pt); pass the .ckpt file or the folder Lightning's FSDP strategy wrote")
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

    return _format_checkpoint(_load_distributed_checkpoint(path))
