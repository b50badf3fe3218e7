"""The real-size path on tiny stand-ins: bad release folders and adapters fail in one line before
the model is built, a bf16 release loads as views of its mmap (no copy of the frozen base), and
the host-RAM check names its figures. The measured full-size runs are benchmarks/real_size.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _release import write_release
from safetensors.torch import load_file, save_file

from ditfuse.interop import weights
from ditfuse.interop.convert import check_adapter, check_pretrained, load_original_transformer
from ditfuse.commands.lightning_cli import check_model_config


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny OmniGen-v1 folder stored in bf16, as the release ships, official LoRA folder)."""
    model, lora = write_release(tmp_path_factory.mktemp("rel"), vae=False)
    sd = load_file(str(model / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(model / "model.safetensors"))
    return model, lora


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bf16_release_loads_as_views_of_its_mmap(release):
    model_dir, _ = release
    model = load_original_transformer(model_dir, torch.bfloat16)
    attn = model.layers[0].self_attn
    # q, k, v are row blocks of the file's fused qkv_proj: one storage, no copy
    storages = {m.weight.untyped_storage().data_ptr() for m in (attn.to_q, attn.to_k, attn.to_v)}
    assert len(storages) == 1
    assert attn.to_k.weight.data_ptr() - attn.to_q.weight.data_ptr() == attn.to_q.weight.nbytes
    ref = load_file(str(model_dir / "model.safetensors"))["llm.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]), ref)


def test_lora_module_keeps_the_bf16_base_uncopied(release):
    from ditfuse.model.lora import LoraSettings
    from ditfuse.module import DiTFuseModule

    model_dir, _ = release
    m = DiTFuseModule(preset="omnigen-v1", pretrained=str(model_dir), tokenizer=str(model_dir),
                      lora=LoraSettings(r=2, alpha=2.0), base_dtype="bf16", vae_path=None,
                      model_overrides={"codec": "pixel", "in_channels": 12, "codec_downsample": 2})
    attn = m.backbone.transformer.layers[0].self_attn
    q, k = attn.to_q.base_layer.weight, attn.to_k.base_layer.weight
    assert q.dtype == torch.bfloat16 and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    # the adapter trains in fp32 on the bf16 base (peft alone would cast it to bf16)
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}


def test_truncated_weights_are_named_before_loading(release, tmp_path):
    folder = _copy(release[0], tmp_path / "cut")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated: .* bytes on disk, its header indexes"):
        check_model_config({"preset": "omnigen-v1", "pretrained": str(folder)})
    f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(ValueError, match="not even a safetensors header"):
        check_pretrained(folder)
    f.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header bytes but the file has 10 bytes"):
        check_pretrained(folder)


def test_a_missing_weight_shard_is_named(release, tmp_path):
    folder = _copy(release[0], tmp_path / "shards")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors is missing \(1 of 2 weight shards"):
        check_pretrained(folder)


def test_config_of_another_model_is_named_before_loading(release, tmp_path):
    folder = _copy(release[0], tmp_path / "other")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(ValueError, match=r"tensor 'llm\.layers\.0\.mlp\.gate_up_proj\.weight' has shape .* but "
                                         r"config\.json: 2 layers.* expects"):
        check_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="the weights lack .* tensors of the model its config.json: 3 layers"):
        check_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'; OmniGen-v1's is 'phi3'"):
        check_pretrained(folder)


def test_lora_of_another_rank_fails_before_the_model_is_built(release, tmp_path, monkeypatch):
    from ditfuse import module, pipeline

    model_dir, lora = release
    bad = _copy(lora, tmp_path / "lora")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": cfg["r"] + 1}))
    check_adapter(lora)  # the shipped one is consistent
    def never(*a, **k):
        raise AssertionError("the model was built before the adapter was checked")
    monkeypatch.setattr(module.DiTFuseModule, "__init__", never)
    with pytest.raises(ValueError, match=rf"lora_A of 'layers\.\d+\.self_attn\.\w+' has rank {cfg['r']} but "
                                         rf"adapter_config\.json says r={cfg['r'] + 1}"):
        pipeline.load_module(model=str(model_dir), lora=str(bad))


def test_not_enough_host_ram_says_so_with_the_figures(release, monkeypatch):
    monkeypatch.setattr(weights, "mem_available", lambda: 2**20)  # 1 MiB free
    with pytest.raises(MemoryError, match=r"needs \d+\.\d MiB of host RAM but only 1\.0 MiB is available") as err:
        check_model_config({"preset": "omnigen-v1", "pretrained": str(release[0])})
    assert "\n" not in str(err.value)


def test_load_bytes_counts_only_conversions_as_copies(release):
    infos = weights.read_header(release[0] / "model.safetensors")
    mapped, copied = weights.load_bytes(infos, torch.bfloat16)
    assert copied == 0 and mapped == sum(i.nbytes for i in infos.values())
    assert weights.load_bytes(infos, torch.float32)[1] == 2 * mapped


def test_resuming_a_lora_of_another_rank_names_the_setting():
    from ditfuse.model.lora import LoraSettings
    from ditfuse.module import DiTFuseModule

    m = DiTFuseModule(preset="tiny", model_overrides={"num_layers": 1}, lora=LoraSettings(r=2, alpha=2.0))
    with pytest.raises(ValueError, match=r"the checkpoint's LoRA has rank r=4 but model\.lora\.r is 2; "
                                         r"set model\.lora\.r=4"):
        m.on_load_checkpoint({"ditfuse": {"lora": {"r": 4}}, "state_dict": {}})
