"""Stand-ins for the released folders, laid out as the release lays them out.

OmniGen-v1 (huggingface.co/Shitao/OmniGen-v1, the folder diffusers' convert_omnigen_to_diffusers.py
reads): config.json (a Phi-3 config, rope_scaling type "su"), model.safetensors (`llm.*`,
`x_embedder`, ... keys), the Phi-3/Llama tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) and, in newer snapshots, vae/ (an SDXL AutoencoderKL). The DiTFuse LoRA
is a peft folder (adapter_config.json + adapter_model.safetensors) on the fused qkv_proj / o_proj.
Everything here is tiny and random; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from _tiny_checkpoints import (
    TINY_PHI3,
    official_adapter,
    write_adapter,
    write_original_checkpoint,
)

from ditfuse.core import prompts as P
from ditfuse.model.conditioning import PREFIX, SUFFIX

RELEASE_PHI3 = {**TINY_PHI3, "vocab_size": 192, "pad_token_id": 0, "max_position_embeddings": 4096,
                "original_max_position_embeddings": 4096}  # OmniGen-v1's switch: 4096 positions
OFFICIAL_LORA = {"peft_type": "LORA", "r": 3, "lora_alpha": 5, "lora_dropout": 0.0,
                 "target_modules": ["qkv_proj", "o_proj"], "init_lora_weights": "gaussian", "bias": "none",
                 "task_type": None, "base_model_name_or_path": "Shitao/OmniGen-v1"}
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>"]


def write_tokenizer(folder: Path, vocab_size: int = 192) -> None:
    """A Llama-style (sentencepiece BPE, byte fallback, BOS added) tokenizer.json + configs."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    corpus = [PREFIX, SUFFIX, P.NEGATIVE_PROMPT] + [P.default_prompt(t) for t in ("ivif", "mff", "mef", "m3")]
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False)  # as Phi-3's
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_vae(folder: Path) -> None:
    """A tiny SDXL-shaped AutoencoderKL (4 levels: 8x down, 4 latent channels)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=64, scaling_factor=0.13025)
    with torch.no_grad():  # a near-deterministic posterior, like the SDXL VAE's (the original samples it)
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-20.0)
    vae.save_pretrained(folder)


def write_release(root: Path, vae: bool = True, cfg: dict | None = None) -> tuple[Path, Path]:
    """(OmniGen-v1 folder, DiTFuse LoRA folder) under root; `cfg` overrides RELEASE_PHI3 keys."""
    model = root / "OmniGen-v1"
    write_original_checkpoint(model, cfg={**RELEASE_PHI3, **(cfg or {})})
    write_tokenizer(model)
    if vae:
        write_vae(model / "vae")
    lora = write_adapter(root / "DiTFuse-lora", official_adapter(r=OFFICIAL_LORA["r"]), OFFICIAL_LORA)
    return model, lora
