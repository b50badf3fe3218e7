"""Weight interop (issue 4, item 3): layouts, official LoRA, merge, `ditfuse convert`.

Every equality is on outputs of tiny random models in float32 at atol 1e-5 (DESIGN.md "Interop
facts"). The reference for the original layout is an independent forward of the original
architecture: transformers' Phi3 decoder layers (fused qkv_proj, longrope) + OmniGen's embedders
and final layer re-implemented in _tiny_checkpoints.py. Adapters use lora_alpha != r throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_checkpoints import (
    HIDDEN,
    LAYERS,
    TINY_PHI3,
    diffusers_forward,
    hand_merge_official,
    official_adapter,
    omnigen_inputs,
    original_forward,
    ours_adapter,
    write_adapter,
    write_original_checkpoint,
)

from ditfuse.commands import convert as convert_command
from ditfuse.interop import convert as C

ATOL = 1e-5
R, ALPHA = 3, 5  # alpha != r: a wrong scale cannot pass
OFFICIAL_CONFIG = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
                   "target_modules": ["qkv_proj", "o_proj"], "init_lora_weights": "gaussian",
                   "bias": "none", "task_type": None, "base_model_name_or_path": "Shitao/OmniGen-v1"}
OURS_CONFIG = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
               "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "bias": "none"}
LONG = {"batch": 2, "text": 5, "in_hw": 8, "out_hw": 8}  # 41 positions > original_max 32: long_factor
SHORT = {"batch": 2, "text": 4, "in_hw": None, "out_hw": 4}  # 12 positions: short_factor


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("omnigen_original")
    return folder, write_original_checkpoint(folder)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    assert diff < ATOL, f"max abs diff {diff:.2e} >= {ATOL}"
    return diff


# ----------------------------------------------------------------------------- model layouts
@pytest.mark.parametrize("case", [LONG, SHORT], ids=["long_rope", "short_rope"])
def test_original_layout_equals_phi3_reference(original, case):
    folder, sd = original
    inputs = omnigen_inputs(case["batch"], case["text"], case["in_hw"], case["out_hw"])
    model = C.load_original_transformer(folder)
    ref = original_forward(sd, TINY_PHI3, **inputs)
    _close(diffusers_forward(model, inputs), ref)
    # the case really exercises its RoPE branch: swapping the factors changes the reference
    swapped = json.loads(json.dumps(TINY_PHI3))
    rope = swapped["rope_scaling"]
    rope["short_factor"], rope["long_factor"] = rope["long_factor"], rope["short_factor"]
    assert (original_forward(sd, swapped, **inputs) - ref).abs().max() > 1e-2


def test_detect_layout_and_load_either(original, tmp_path):
    folder, _ = original
    assert C.detect_layout(folder) == "original"
    model = C.load_transformer(folder, dtype=torch.float32)
    model.save_pretrained(str(tmp_path / "diff" / "transformer"))
    assert C.detect_layout(tmp_path / "diff") == "diffusers"
    assert C.detect_layout(tmp_path / "diff" / "transformer") == "diffusers"
    inputs = omnigen_inputs(**LONG)
    _close(diffusers_forward(C.load_transformer(tmp_path / "diff"), inputs), diffusers_forward(model, inputs))


def test_missing_paths_are_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a local folder"):
        C.load_transformer(tmp_path / "nope")
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text(json.dumps(TINY_PHI3))
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        C.load_transformer(tmp_path / "cfg_only")
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        C.load_adapter_state(tmp_path / "cfg_only")


def test_round_trip_diffusers_original_diffusers_is_identity(original):
    _, sd = original
    config = C.transformer_config_from_original(TINY_PHI3)
    ours = C.convert_original_state_dict(sd, config)
    back = C.convert_diffusers_state_dict(ours)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    again = C.convert_original_state_dict(back, config)
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)


def test_transformer_config_from_original():
    cfg = C.transformer_config_from_original(TINY_PHI3)
    assert cfg["pad_token_id"] == 3 and cfg["vocab_size"] == 64 and cfg["num_layers"] == LAYERS
    assert cfg["rope_base"] == 10000.0 and cfg["original_max_position_embeddings"] == 32
    assert cfg["rope_scaling"] == {k: TINY_PHI3["rope_scaling"][k] for k in ("short_factor", "long_factor")}
    assert {k: cfg[k] for k in C.ORIGINAL_FIXED} == {"in_channels": 4, "patch_size": 2,
                                                      "pos_embed_max_size": 192, "time_step_dim": 256}
    # transformers v5 style (rope_parameters, "longrope") reads the same
    v5 = {k: v for k, v in TINY_PHI3.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**TINY_PHI3["rope_scaling"], "rope_type": "longrope", "rope_theta": 10000.0}
    assert C.transformer_config_from_original(v5) == cfg
    with pytest.raises(ValueError, match="not supported by OmniGen's RoPE"):
        C.transformer_config_from_original({**TINY_PHI3, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="no grouped-query attention"):
        C.transformer_config_from_original({**TINY_PHI3, "num_key_value_heads": 2})


def test_qkv_split_at_head_boundaries():
    # qkv splits at [n_heads*head_dim, +n_kv*head_dim] (not thirds) when kv heads differ
    config = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
    qkv = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)
    out = C.convert_original_state_dict({"llm.layers.0.self_attn.qkv_proj.weight": qkv}, config)
    assert out["layers.0.self_attn.to_q.weight"].shape[0] == 32
    assert torch.equal(out["layers.0.self_attn.to_k.weight"], qkv[32:48])
    assert torch.equal(out["layers.0.self_attn.to_v.weight"], qkv[48:])
    with pytest.raises(ValueError, match="rows but the config's heads give"):
        C.convert_original_state_dict({"llm.layers.0.self_attn.qkv_proj.weight": qkv[:60]}, config)


# ----------------------------------------------------------------------------- official LoRA
def _official_variant(sd: dict, style: str) -> dict:
    if style == "peft_saved":
        return sd
    if style == "no_llm":  # adapter trained on OmniGen.llm alone
        return {k.replace("base_model.model.llm.", "base_model.model."): v for k, v in sd.items()}
    return {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}  # raw state_dict()


@pytest.mark.parametrize("style", ["peft_saved", "no_llm", "with_adapter_name"])
def test_official_lora_equals_fused_lora_by_hand(original, tmp_path, style):
    folder, sd = original
    adapter = official_adapter(R)
    ref = original_forward(hand_merge_official(sd, adapter, ALPHA / R), TINY_PHI3, **omnigen_inputs(**LONG))
    lora_dir = write_adapter(tmp_path / "official", _official_variant(adapter, style), OFFICIAL_CONFIG)
    assert C.detect_adapter_format(lora_dir) == "official"
    ours, config = C.load_adapter_state(lora_dir)
    assert config["r"] == R and config["lora_alpha"] == ALPHA
    assert set(config["target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert all(k.startswith("layers.") for k in ours)
    inputs = omnigen_inputs(**LONG)
    unmerged = C.inject_lora(C.load_transformer(folder), ours, config)  # peft, not merged
    _close(diffusers_forward(unmerged, inputs), ref)
    merged = C.merge_lora(C.load_transformer(folder), ours, config)
    _close(diffusers_forward(merged, inputs), ref)


def test_official_lora_a_copied_b_split():
    adapter = official_adapter(R)
    ours, _ = C.convert_official_lora(adapter, OFFICIAL_CONFIG)
    a = adapter["base_model.model.llm.layers.1.self_attn.qkv_proj.lora_A.weight"]
    b = adapter["base_model.model.llm.layers.1.self_attn.qkv_proj.lora_B.weight"]
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        assert torch.equal(ours[f"layers.1.self_attn.{name}.lora_A.weight"], a)
        assert torch.equal(ours[f"layers.1.self_attn.{name}.lora_B.weight"], b[i * HIDDEN:(i + 1) * HIDDEN])
    assert torch.equal(ours["layers.1.self_attn.to_out.0.lora_B.weight"],
                       adapter["base_model.model.llm.layers.1.self_attn.o_proj.lora_B.weight"])


def test_export_official_round_trip_shared_a_is_exact():
    adapter = official_adapter(R)
    ours, config = C.convert_official_lora(adapter, OFFICIAL_CONFIG)
    back, back_config = C.export_official_lora(ours, config)
    assert set(back) == set(adapter) and all(torch.equal(back[k], adapter[k]) for k in adapter)
    assert (back_config["r"], back_config["lora_alpha"]) == (R, ALPHA)
    assert set(back_config["target_modules"]) == {"qkv_proj", "o_proj"}


def _deltas(sd: dict, config: dict) -> dict[str, torch.Tensor]:
    groups = C._group(sd)
    return {m: C.lora_scale(config, m) * ab["B"] @ ab["A"] for m, ab in groups.items()}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_official_block_diagonal_is_exact(original, tmp_path, use_rslora):
    folder, sd = original
    ours = ours_adapter(R)  # three different A per layer
    config = {**OURS_CONFIG, "use_rslora": use_rslora}
    official, off_config = C.export_official_lora(ours, config)
    assert off_config["r"] == 3 * R
    qkv_b = official["base_model.model.llm.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert qkv_b.shape == (3 * HIDDEN, 3 * R)
    assert torch.count_nonzero(qkv_b[:HIDDEN, R:]) == 0 and torch.count_nonzero(qkv_b[HIDDEN:2 * HIDDEN, :R]) == 0
    # scale kept: the official adapter applied by hand on the original model == ours on diffusers
    scale = C.lora_scale(off_config)
    assert scale == pytest.approx(C.lora_scale(config), rel=1e-12)
    inputs = omnigen_inputs(**LONG)
    ref = original_forward(hand_merge_official(sd, official, scale), TINY_PHI3, **inputs)
    _close(diffusers_forward(C.merge_lora(C.load_transformer(folder), ours, config), inputs), ref)
    # and back: the zero blocks drop out again, so the round trip restores every tensor and r/alpha
    back, back_config = C.convert_official_lora(official, off_config)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    assert back_config["r"] == R and back_config["lora_alpha"] == pytest.approx(ALPHA, rel=1e-12)
    for m, delta in _deltas(ours, config).items():
        _close(_deltas(back, back_config)[m], delta)


def test_export_official_missing_projection_gets_zero_rows():
    ours = ours_adapter(R, modules=("to_q", "to_v", "to_out.0"))
    official, off_config = C.export_official_lora(ours, OURS_CONFIG)
    qkv_b = official["base_model.model.llm.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert off_config["r"] == 2 * R and torch.count_nonzero(qkv_b[HIDDEN:2 * HIDDEN]) == 0
    back, back_config = C.convert_official_lora(official, off_config)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    assert (back_config["r"], back_config["lora_alpha"]) == (R, ALPHA)


def test_untrained_official_adapter_keeps_its_rank():
    adapter = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in official_adapter(R).items()}
    ours, config = C.convert_official_lora(adapter, OFFICIAL_CONFIG)
    assert (config["r"], config["lora_alpha"]) == (R, ALPHA) and len(ours) == 4 * 2 * LAYERS


# ----------------------------------------------------------------------------- merge
def test_merge_equals_unmerged_adapter_and_w_plus_scaled_ba(original):
    folder, _ = original
    ours = ours_adapter(R)
    inputs = omnigen_inputs(**LONG)
    unmerged = C.inject_lora(C.load_transformer(folder), ours, OURS_CONFIG)
    merged = C.merge_lora(C.load_transformer(folder), ours, OURS_CONFIG)
    _close(diffusers_forward(merged, inputs), diffusers_forward(unmerged, inputs))
    base = C.load_transformer(folder)
    a, b = ours["layers.1.self_attn.to_v.lora_A.weight"], ours["layers.1.self_attn.to_v.lora_B.weight"]
    expected = base.layers[1].self_attn.to_v.weight + ALPHA / R * b @ a
    _close(merged.layers[1].self_attn.to_v.weight, expected)
    assert type(merged.layers[1].self_attn.to_v) is torch.nn.Linear  # adapter gone after merging


def test_adapter_format_detection(tmp_path):
    official = write_adapter(tmp_path / "o", official_adapter(R), OFFICIAL_CONFIG)
    ours = write_adapter(tmp_path / "d", ours_adapter(R), OURS_CONFIG)
    peft_wrapped = {f"base_model.model.{k}": v for k, v in ours_adapter(R).items()}
    wrapped = write_adapter(tmp_path / "w", peft_wrapped, OURS_CONFIG)
    assert C.detect_adapter_format(official) == "official"
    assert C.detect_adapter_format(ours) == "ditfuse"
    assert C.detect_adapter_format(wrapped) == "ditfuse"
    sd, _ = C.load_adapter_state(wrapped)
    assert set(sd) == set(ours_adapter(R))


# ----------------------------------------------------------------------------- CLI
def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = convert_command.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_convert_model_copies_extras_and_refuses_overwrite(original, tmp_path, capsys):
    folder, sd = original
    src = tmp_path / "src"
    src.mkdir()
    for f in folder.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "vae").mkdir()
    (src / "vae" / "config.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")  # the original layout keeps it at the top level
    out = tmp_path / "out"
    code, stdout, _ = _run(["model", "--src", src, "--out", out], capsys)
    assert code == 0, stdout
    assert (out / "vae" / "config.json").is_file() and (out / "tokenizer" / "tokenizer_config.json").is_file()
    from diffusers import OmniGenTransformer2DModel

    model = OmniGenTransformer2DModel.from_pretrained(str(out / "transformer"))
    inputs = omnigen_inputs(**LONG)
    _close(diffusers_forward(model, inputs), original_forward(sd, TINY_PHI3, **inputs))
    # no overwrite without --overwrite: exit 2, one line, nothing touched
    weights = out / "transformer" / C.TRANSFORMER_WEIGHTS
    before = (weights.stat().st_mtime_ns, sorted(p.name for p in out.rglob("*")))
    code, _, err = _run(["model", "--src", src, "--out", out], capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (weights.stat().st_mtime_ns, sorted(p.name for p in out.rglob("*"))) == before
    (out / "stale.txt").write_text("old")
    code, _, _ = _run(["model", "--src", src, "--out", out, "--overwrite"], capsys)
    assert code == 0 and not (out / "stale.txt").exists() and weights.is_file()


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    code, _, err = _run(["model", "--src", tmp_path / "missing", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    code, _, err = _run(["lora", "--src", tmp_path / "missing", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "adapter folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["merge", "--model", tmp_path, "--lora", tmp_path / "x", "--out", tmp_path / "o"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = _run(["model", "--src", tmp_path, "--out", tmp_path, "--overwrite"], capsys)
    assert code == 2 and "would overwrite the input" in err
    assert _run(["--help"], capsys)[0] == 0


def test_cli_lora_merge_and_export(original, tmp_path, capsys):
    folder, sd = original
    adapter = official_adapter(R)
    official_dir = write_adapter(tmp_path / "official", adapter, OFFICIAL_CONFIG)
    inputs = omnigen_inputs(**LONG)
    ref = original_forward(hand_merge_official(sd, adapter, ALPHA / R), TINY_PHI3, **inputs)

    assert _run(["lora", "--src", official_dir, "--out", tmp_path / "ours"], capsys)[0] == 0
    assert C.detect_adapter_format(tmp_path / "ours") == "ditfuse"
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (R, ALPHA)

    from diffusers import OmniGenTransformer2DModel

    for lora in (official_dir, tmp_path / "ours"):  # original layout + either adapter format
        out = tmp_path / f"merged_{lora.name}"
        assert _run(["merge", "--model", folder, "--lora", lora, "--out", out], capsys)[0] == 0
        merged = OmniGenTransformer2DModel.from_pretrained(str(out / "transformer"))
        _close(diffusers_forward(merged, inputs), ref)

    assert _run(["export-official", "--lora", tmp_path / "ours", "--out", tmp_path / "back"], capsys)[0] == 0
    back, back_config = C._load_tensors(tmp_path / "back" / "adapter_model.safetensors"), \
        json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert all(torch.equal(back[k], adapter[k]) for k in adapter) and back_config["lora_alpha"] == ALPHA
    code, _, err = _run(["export-official", "--lora", official_dir, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "already an official" in err


def test_interop_with_ditfuse_lora_adapter_folders(original, tmp_path):
    from ditfuse.model import lora

    folder, _ = original
    settings = lora.LoraSettings(r=R, alpha=float(ALPHA))
    model = lora.add_lora(C.load_transformer(folder), settings)
    lora.load_lora_state_dict(model, ours_adapter(R))
    lora.save_adapter(model, tmp_path / "trained", settings)  # the training side's writer
    sd, config = C.load_adapter_state(tmp_path / "trained")
    assert set(sd) == set(ours_adapter(R)) and (config["r"], config["lora_alpha"]) == (R, ALPHA)
    _, off_config = C.export_official_lora(sd, config)
    assert "ditfuse" not in off_config
    C.lora_config_from_dict(off_config)  # peft accepts the exported config
    C.save_adapter(tmp_path / "ours", sd, config)  # and the training side reads ours back
    fresh = C.load_transformer(folder)
    assert lora.load_adapter(fresh, tmp_path / "ours").scale == pytest.approx(ALPHA / R)
    inputs = omnigen_inputs(**LONG)
    _close(diffusers_forward(fresh, inputs), diffusers_forward(model, inputs))


def test_sharded_original_checkpoint(original, tmp_path):
    from safetensors.torch import save_file

    folder, sd = original
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY_PHI3))
    inputs = omnigen_inputs(**SHORT)
    _close(diffusers_forward(C.load_transformer(tmp_path), inputs),
           diffusers_forward(C.load_transformer(folder), inputs))


def test_fused_qkv_delta_does_not_depend_on_the_order_parts_arrive_in():
    """safetensors returns keys sorted (to_k before to_q): the fused delta must still put each
    projection's B@A in its own row block."""
    from ditfuse.interop.convert import _fuse_qkv

    g = torch.Generator().manual_seed(0)
    parts = {n: {"A": torch.randn(2, 6, generator=g), "B": torch.randn(4, 2, generator=g)}
             for n in ("to_k", "to_q", "to_v")}  # deliberately not q, k, v
    a, b = _fuse_qkv(parts, {"to_q": 1.0, "to_k": 1.0, "to_v": 1.0})
    delta = b @ a  # (12, 6)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(delta[4 * i:4 * (i + 1)], parts[name]["B"] @ parts[name]["A"])
