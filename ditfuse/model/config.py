"""Typed model presets (`tiny`, `omnigen-v1`), litgpt style: `ModelConfig.from_name("tiny")`.

A preset fixes the transformer shape, the codec and the tokenizer kind. Real weights bring
their own `config.json`; the preset then only decides the codec/tokenizer defaults and is the
shape used for random init (tests, demo, benchmarks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ditfuse.model.tokenizer import BuiltinTokenizer

CodecKind = Literal["pixel", "vae"]
TokenizerKind = Literal["builtin", "pretrained"]


@dataclass
class ModelConfig:
    name: str
    # --- transformer (names follow diffusers.OmniGenTransformer2DModel) ---
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    pad_token_id: int
    in_channels: int
    patch_size: int = 2  # fixed by the OmniGen class (docs/DESIGN.md interop facts)
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    rope_base: int = 10000
    rope_scaling: dict[str, list[float]] | None = None  # filled with ones when None
    pos_embed_max_size: int = 192  # OmniGen: 192 patches per side
    time_step_dim: int = 256  # OmniGen
    # --- companions ---
    codec: CodecKind = "vae"
    # latent pixels per image pixel side: 8 for the SDXL VAE, 2 for the pixel codec
    codec_downsample: int = 8
    tokenizer: TokenizerKind = "pretrained"

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"model preset {self.name!r}: {msg}")

        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need((self.hidden_size // self.num_attention_heads) % 2 == 0, "the head dim must be even for RoPE")
        need(0 <= self.pad_token_id < self.vocab_size,
             f"pad_token_id ({self.pad_token_id}) must lie in [0, vocab_size={self.vocab_size})")
        need(self.codec in ("pixel", "vae"), f"codec must be 'pixel' or 'vae', got {self.codec!r}")
        need(self.tokenizer in ("builtin", "pretrained"),
             f"tokenizer must be 'builtin' or 'pretrained', got {self.tokenizer!r}")
        if self.codec == "pixel":
            need(self.in_channels == 12 and self.codec_downsample == 2,
                 "the pixel codec (pixel_unshuffle by 2 of RGB) needs in_channels=12 and codec_downsample=2")
        for k in ("num_layers", "intermediate_size", "patch_size", "pos_embed_max_size", "time_step_dim"):
            need(getattr(self, k) > 0, f"{k} must be positive, got {getattr(self, k)}")
        half = self.head_dim // 2
        if self.rope_scaling is None:
            self.rope_scaling = {"short_factor": [1.0] * half, "long_factor": [1.0] * half}
        for k in ("short_factor", "long_factor"):
            need(len(self.rope_scaling.get(k, [])) == half,
                 f"rope_scaling[{k!r}] needs head_dim/2 = {half} values")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per token side (16 for VAE + patch 2, as OmniGen's `// 16 // 16`)."""
        return self.codec_downsample * self.patch_size

    def transformer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `OmniGenTransformer2DModel(**kwargs)`."""
        keys = ("in_channels", "patch_size", "hidden_size", "rms_norm_eps", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "num_layers", "pad_token_id", "vocab_size",
                "max_position_embeddings", "original_max_position_embeddings", "rope_base",
                "rope_scaling", "pos_embed_max_size", "time_step_dim")
        return {k: getattr(self, k) for k in keys}

    def replace(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}: use one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


def _tiny() -> ModelConfig:
    tok = BuiltinTokenizer()
    # ~1.1M parameters: the size of the prototype that reached +8 dB over mean fusion at 32x32.
    return ModelConfig(
        name="tiny", hidden_size=128, num_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=384, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
        in_channels=12, codec="pixel", codec_downsample=2, tokenizer="builtin",
        # 64 patches per side = 256 px with the pixel codec; keeps the sincos buffer at 2 MB
        pos_embed_max_size=64, max_position_embeddings=4096, original_max_position_embeddings=4096,
    )


# OmniGen-v1 (Phi-3-mini backbone, arXiv 2409.11340): 32 layers, 3072 hidden, 32 heads, 8192 MLP,
# vocab 32064, pad 32000; in_channels 4 (SDXL VAE latents). The real rope_scaling factors come from
# the checkpoint's config.json; the preset's ones are only used for random-init benchmarks.
_OMNIGEN_V1 = dict(
    name="omnigen-v1", hidden_size=3072, num_layers=32, num_attention_heads=32, num_key_value_heads=32,
    intermediate_size=8192, vocab_size=32064, pad_token_id=32000, in_channels=4, codec="vae",
    codec_downsample=8, tokenizer="pretrained", max_position_embeddings=131072,
    original_max_position_embeddings=4096,
)


class _Presets(dict):
    """Lazily built presets (tiny needs the tokenizer's vocabulary size)."""

    _factories = {"tiny": _tiny, "omnigen-v1": lambda: ModelConfig(**_OMNIGEN_V1)}

    def __contains__(self, key: object) -> bool:
        return key in self._factories

    def __getitem__(self, key: str) -> ModelConfig:
        if not dict.__contains__(self, key):
            dict.__setitem__(self, key, self._factories[key]())
        return dict.__getitem__(self, key)

    def __iter__(self):
        return iter(self._factories)


PRESETS = _Presets()
PRESET_NAMES: tuple[str, ...] = ("tiny", "omnigen-v1")
