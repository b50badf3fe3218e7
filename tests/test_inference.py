"""`ditfuse fuse` and `ditfuse predict` on the tiny preset: input cases, no-overwrite, folder and
prompt-file modes, prompt building, checkpoint / adapter loading, sharded predict.

Everything runs at 1-2 Euler steps on images of a few dozen pixels.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules.pairs import (
    PairBatches,
    find_pairs,
    make_prompt,
    pad_to,
    prepare_pair,
    processing_size,
    read_prompt_file,
    restore,
)
from ditfuse import pipeline
from ditfuse.commands import fuse as inference
from ditfuse.commands.fuse import Job, main, run_jobs
from ditfuse.pipeline import FusionPipeline
from ditfuse.core.prompts import IMAGE_1, IMAGE_2
from ditfuse.sampling.sampler import SamplerSettings

RANDOM = ["--preset", "tiny", "--steps", "1", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny model whose output layers are not zero (a fresh init predicts zero velocity, so its
    samples would be the initial noise whatever the inputs and prompt), in diffusers layout."""
    from ditfuse.module import DiTFuseModule

    tr = DiTFuseModule(preset="tiny").backbone.transformer
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (*tr.norm_out.parameters(), *tr.proj_out.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tr.save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def fast(tiny_dir) -> list[str]:
    return ["--model", str(tiny_dir), *RANDOM]


def _write(path: Path, h: int, w: int, channels: int = 3, bits: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    top = 255 if bits == 8 else 65535
    shape = (h, w) if channels == 1 else (h, w, channels)
    arr = rng.integers(0, top + 1, size=shape).astype(np.uint8 if bits == 8 else np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr), path
    return path


def _hw(path: Path) -> tuple[int, int]:
    return tuple(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[:2])


@pytest.fixture(scope="module")
def pipe(tiny_dir) -> FusionPipeline:
    return FusionPipeline.load(model=str(tiny_dir), preset="tiny", device="cpu", dtype="fp32",
                               sampler=SamplerSettings(steps=1), warn=lambda m: None)


# ---------------------------------------------------------------------------------------------
# Pre/post-processing and prompts (no model)
# ---------------------------------------------------------------------------------------------
def test_processing_size_scales_down_only_and_pads_to_the_grid():
    assert processing_size(480, 640, 1024) == (480, 640)
    assert processing_size(768, 2048, 1024) == (384, 1024)
    x = torch.rand(2, 3, 13, 21)
    y = pad_to(x, (16, 24))
    assert y.shape == (2, 3, 16, 24) and torch.equal(y[..., :13, :21], x)
    assert pad_to(torch.rand(1, 3, 2, 3), (4, 8)).shape == (1, 3, 4, 8)  # replicate when too small


def test_prepare_and_restore_round_trip_at_image1_size():
    a = (np.random.default_rng(0).random((13, 21, 3)) * 255).astype(np.uint8)
    item = prepare_pair(a, a[:5, :7], max_side=64, multiple=4)
    assert item.images.shape == (2, 3, 16, 24) and item.image2_resized_from == (5, 7)
    back = restore(item.images[0], item.content_hw, item.original_hw)
    assert back.shape == (13, 21, 3) and np.abs(back.astype(int) - a).max() <= 1


def test_prompt_building_for_task_control_segment_and_free_text():
    ivif = make_prompt("ivif")
    assert ivif.startswith("[FUSION]. <MULTI-MODALITIES>. ") and IMAGE_1 in ivif and IMAGE_2 in ivif
    ctrl = make_prompt(None, control="LIGHT+")
    assert ctrl.startswith("[CONTROL]. <LIGHT+>. ") and "Slightly brighten" in ctrl
    assert "thermal" in make_prompt("ivif", control="CONTRAST-")  # base instruction of --task
    seg = make_prompt(segment="tree")
    assert seg.startswith("[SEG]. This is the first image") and "Segment the tree in the image." in seg
    free = make_prompt(None, "Keep the sky blue")
    assert free.startswith("[FUSION]. This is") and free.endswith("Keep the sky blue.")
    assert make_prompt("mef", "Fuse").startswith("[FUSION]. <MULTI-EXPOSURE>. ")
    assert make_prompt(None, ivif) == ivif  # a full prompt is used verbatim
    with pytest.raises(ValueError, match="--segment"):
        make_prompt("ivif", segment="car")
    with pytest.raises(ValueError, match="LIGHT"):
        make_prompt(None, control="LIGHT+++")


def test_cli_control_and_segment_reach_the_jobs(tmp_path):
    a, b = _write(tmp_path / "a.png", 8, 8), _write(tmp_path / "b.png", 8, 8)
    base = ["--image1", str(a), "--image2", str(b), "--output", str(tmp_path / "o.png")]
    jobs, _ = inference.build_jobs(inference.parser().parse_args([*base, "--task", "mff", "--control", "LIGHT--"]))
    assert jobs[0].prompt.startswith("[CONTROL]. <LIGHT-->. ") and "sharp" in jobs[0].prompt
    jobs, _ = inference.build_jobs(inference.parser().parse_args([*base, "--segment", "person"]))
    assert "Segment the person in the image." in jobs[0].prompt


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0
    text = capsys.readouterr().out
    options = ["--model", "--preset", "--lora", "--checkpoint", "--no-ema", "--vae", "--tokenizer", "--image1",
               "--image2", "--output", "--pairs-dir", "--image1-dir", "--image2-dir", "--output-dir", "--overwrite",
               "--task", "--prompt", "--prompt-file", "--control", "--segment", "--steps", "--guidance-scale",
               "--img-guidance-scale", "--seed", "--max-side", "--batch-size", "--no-kv-cache",
               "--sequential-branches", "--device", "--dtype", "--fast", "--solver", "--schedule", "--shift",
               "--guidance-interval", "--cache-threshold"]
    for opt in options:
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(opt + " ") or ln.strip() == opt
                     or ln.strip().startswith(opt + ",")), None)
        assert line is not None, f"{opt} missing from --help"
    for word in ("LIGHT++", "CONTRAST+", "ivif", "original size", "Exit status"):
        assert word in text


# ---------------------------------------------------------------------------------------------
# Input cases: output at image 1's original size
# ---------------------------------------------------------------------------------------------
CASES = [  # (ext1, bits1, ch1, size1, ext2, bits2, ch2, size2)
    (".png", 8, 3, (13, 21), ".png", 8, 3, (13, 21)),
    (".png", 16, 1, (17, 10), ".png", 16, 3, (17, 10)),
    (".png", 8, 4, (9, 9), ".bmp", 8, 1, (9, 9)),
    (".jpg", 8, 3, (15, 22), ".jpg", 8, 1, (30, 44)),  # image 2 larger: resized to image 1
    (".bmp", 8, 3, (11, 19), ".tif", 16, 1, (7, 5)),  # odd sizes, 16-bit TIFF, smaller image 2
    (".tiff", 16, 3, (20, 12), ".png", 8, 4, (20, 12)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}{c[1]}b{c[2]}c-{c[4]}{c[5]}b{c[6]}c")
def test_input_cases_give_an_output_at_image1_size(tmp_path, pipe, case):
    e1, b1, c1, s1, e2, b2, c2, s2 = case
    a = _write(tmp_path / f"a{e1}", *s1, channels=c1, bits=b1)
    b = _write(tmp_path / f"b{e2}", *s2, channels=c2, bits=b2, seed=1)
    out = tmp_path / "fused.png"
    run_jobs(pipe, [Job("a", a, b, make_prompt("ivif"), out)])
    img = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert img.shape == (*s1, 3) and img.dtype == np.uint8


def test_cli_single_pair_mismatched_sizes_warns_and_writes_jpeg(tmp_path, capsys):
    a, b = _write(tmp_path / "a.png", 13, 22), _write(tmp_path / "b.png", 26, 44, channels=1, seed=3)
    out = tmp_path / "sub" / "fused.jpg"
    assert main([*RANDOM, "--image1", str(a), "--image2", str(b), "--task", "ivif", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "resized image 2 to image 1's size" in err and "RANDOM" in err
    assert _hw(out) == (13, 22)


def test_max_side_scales_down_and_output_keeps_the_source_size(tmp_path, fast):
    a, b = _write(tmp_path / "a.png", 30, 50), _write(tmp_path / "b.png", 30, 50, seed=2)
    out = tmp_path / "o.png"
    assert main([*fast, "--image1", str(a), "--image2", str(b), "--task", "mff", "--max-side", "16",
                 "--output", str(out)]) == 0
    assert _hw(out) == (30, 50)
    assert main([*fast, "--image1", str(a), "--image2", str(b), "--task", "mff", "--max-side", "18",
                 "--output", str(tmp_path / "p.png")]) == 1


# ---------------------------------------------------------------------------------------------
# Errors: no overwrite, missing / unreadable inputs
# ---------------------------------------------------------------------------------------------
def test_existing_output_is_never_overwritten_without_flag(tmp_path, capsys, fast):
    a, b = _write(tmp_path / "a.png", 8, 12), _write(tmp_path / "b.png", 8, 12, seed=1)
    out = tmp_path / "o.png"
    out.write_bytes(b"keep me")
    args = [*fast, "--image1", str(a), "--image2", str(b), "--task", "mef", "--output", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert main([*args, "--overwrite"]) == 0
    assert _hw(out) == (8, 12)


def test_write_image_refuses_a_file_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"x")
    with pytest.raises(inference.FuseError, match="already exists"):
        inference.write_image(out, np.zeros((4, 4, 3), np.uint8), overwrite=False)
    assert out.read_bytes() == b"x"


@pytest.mark.parametrize("bad", ["missing", "garbage"])
def test_missing_or_unreadable_input_is_one_line(tmp_path, capsys, bad, fast):
    a = _write(tmp_path / "a.png", 8, 8)
    b = tmp_path / "b.png"
    if bad == "garbage":
        b.write_bytes(b"not an image")
    rc = main([*fast, "--image1", str(a), "--image2", str(b), "--task", "ivif", "--output", str(tmp_path / "o.png")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ditfuse fuse")]
    assert rc == 1 and len(err) == 1 and str(b) in err[0]
    assert not (tmp_path / "o.png").exists()


def test_no_prompt_and_no_model_are_clear_errors(tmp_path, capsys, fast):
    a = _write(tmp_path / "a.png", 8, 8)
    assert main([*fast, "--image1", str(a), "--image2", str(a), "--output", str(tmp_path / "o.png")]) == 1
    assert "--task" in capsys.readouterr().err
    assert main(["--image1", str(a), "--image2", str(a), "--task", "ivif", "--output", str(tmp_path / "o.png")]) == 1
    assert "--model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Folder and prompt-file modes
# ---------------------------------------------------------------------------------------------
def _pairs_dir(root: Path) -> Path:
    for name, hw in (("a", (12, 16)), ("b", (12, 16)), ("c", (9, 13)), ("d", (12, 16))):
        _write(root / "image1" / f"{name}.png", *hw)
        _write(root / "image2" / f"{name}.png", *hw, channels=1, seed=5)
    (root / "image2" / "c.png").write_bytes(b"broken")  # unreadable partner
    _write(root / "image1" / "lonely.png", 8, 8)  # no partner
    _write(root / "image2" / "e.jpg", 8, 8)  # no partner
    return root


def test_folder_mode_skips_and_lists_bad_pairs(tmp_path, capsys, fast):
    root = _pairs_dir(tmp_path / "pairs")
    out = tmp_path / "out"
    rc = main([*fast, "--pairs-dir", str(root), "--task", "ivif", "--output-dir", str(out), "--batch-size", "2"])
    text = capsys.readouterr().out
    assert rc == 1  # something was skipped
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "d.png"]
    assert all(_hw(out / f"{n}.png") == (12, 16) for n in "abd")
    assert "fused 3 pair(s); skipped 3" in text
    for name in ("skipped c", "skipped lonely.png", "skipped e.jpg"):
        assert name in text


def test_folder_outputs_do_not_depend_on_batch_size(tmp_path, fast):
    root = _pairs_dir(tmp_path / "pairs")
    for bs in (1, 3):
        main([*fast, "--image1-dir", str(root / "image1"), "--image2-dir", str(root / "image2"), "--task", "mff",
              "--output-dir", str(tmp_path / f"bs{bs}"), "--batch-size", str(bs)])
    for n in "abd":
        one, three = cv2.imread(str(tmp_path / "bs1" / f"{n}.png")), cv2.imread(str(tmp_path / "bs3" / f"{n}.png"))
        assert np.abs(one.astype(int) - three.astype(int)).max() <= 1


def test_folder_mode_refuses_existing_outputs_before_work(tmp_path, capsys, fast):
    root = _pairs_dir(tmp_path / "pairs")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"old")
    assert main([*fast, "--pairs-dir", str(root), "--task", "ivif", "--output-dir", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["b.png"] and (out / "b.png").read_bytes() == b"old"


def test_prompt_file_mode_writes_one_output_per_line(tmp_path, fast):
    a, b = _write(tmp_path / "vis.png", 10, 14), _write(tmp_path / "ir.png", 10, 14, channels=1, seed=4)
    prompts = tmp_path / "prompts.txt"
    full = make_prompt("ivif", control="LIGHT+")
    prompts.write_text(f"# comment\nKeep the thermal targets bright\n\n{full}\nSoften the image\n")
    assert len(read_prompt_file(prompts)) == 3
    assert main([*fast, "--image1", str(a), "--image2", str(b), "--task", "ivif", "--prompt-file", str(prompts),
                 "--output-dir", str(tmp_path / "out"), "--steps", "2"]) == 0
    outs = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in outs] == ["vis_001.png", "vis_002.png", "vis_003.png"]
    imgs = [cv2.imread(str(p)).astype(int) for p in outs]
    assert all(im.shape == (10, 14, 3) for im in imgs)
    assert np.abs(imgs[0] - imgs[1]).max() > 0  # the prompt matters, the noise (seed) is shared
    assert main([*fast, "--image1", str(a), "--image2", str(b), "--prompt-file", str(prompts),
                 "--output", str(tmp_path / "x.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("x_*.png")) == ["x_001.png", "x_002.png", "x_003.png"]


def test_kv_cache_and_sequential_branches_do_not_change_the_output(tmp_path, fast):
    a, b = _write(tmp_path / "a.png", 8, 12), _write(tmp_path / "b.png", 8, 12, seed=1)
    outs = []
    for extra in ([], ["--no-kv-cache"], ["--sequential-branches"]):
        out = tmp_path / f"o{len(outs)}.png"
        assert main([*fast, "--image1", str(a), "--image2", str(b), "--task", "ivif", "--steps", "2",
                     "--output", str(out), *extra]) == 0
        outs.append(cv2.imread(str(out)).astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1 and np.abs(outs[0] - outs[2]).max() <= 1


# ---------------------------------------------------------------------------------------------
# Weights: adapters of both formats, Lightning checkpoints with EMA
# ---------------------------------------------------------------------------------------------
def _trained_tiny(lora_seed: int = 0):
    from ditfuse.model.lora import LoraSettings
    from ditfuse.module import DiTFuseModule

    m = DiTFuseModule(preset="tiny", lora=LoraSettings(r=2, alpha=4.0))
    g = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.backbone.transformer.state_dict().items()}


def _expected_merged(trained) -> dict[str, torch.Tensor]:
    from ditfuse.model.lora import merge_and_unload

    return {k: v.clone() for k, v in merge_and_unload(trained.backbone.transformer).state_dict().items()}


def test_our_adapter_loads_to_the_merged_weights(tmp_path):
    from ditfuse.interop.convert import detect_adapter_format

    trained = _trained_tiny()
    ours = trained.save_adapter(tmp_path / "ours")
    assert detect_adapter_format(ours) == "ditfuse"
    expected = _expected_merged(trained)
    got = _weights(pipeline.load_module(preset="tiny", lora=str(ours), warn=lambda m: None))
    assert set(got) == set(expected)
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    base = _weights(pipeline.load_module(preset="tiny", warn=lambda m: None))
    assert not torch.allclose(base["layers.0.self_attn.to_q.weight"], expected["layers.0.self_attn.to_q.weight"])


def test_official_adapter_is_detected_converted_and_merged(tmp_path):
    """An official DiTFuse adapter (peft on OmniGen's fused qkv_proj / o_proj, scale alpha / r = 2):
    q, k, v get W + 2 * B_{q,k,v} @ A with B split in three by rows; o_proj lands on to_out.0."""
    from ditfuse.interop.convert import detect_adapter_format, save_adapter

    base = _weights(pipeline.load_module(preset="tiny", warn=lambda m: None))
    D, r, g = 128, 2, torch.Generator().manual_seed(0)
    sd = {}
    for i in range(4):
        pre = f"base_model.model.llm.layers.{i}.self_attn"
        for mod, rows in (("qkv_proj", 3 * D), ("o_proj", D)):
            sd[f"{pre}.{mod}.lora_A.weight"] = torch.randn(r, D, generator=g) * 0.05
            sd[f"{pre}.{mod}.lora_B.weight"] = torch.randn(rows, r, generator=g) * 0.05
    save_adapter(tmp_path / "official", sd, {"peft_type": "LORA", "r": r, "lora_alpha": 4,
                                              "target_modules": ["qkv_proj", "o_proj"], "bias": "none"})
    assert detect_adapter_format(tmp_path / "official") == "official"
    got = _weights(pipeline.load_module(preset="tiny", lora=str(tmp_path / "official"), warn=lambda m: None))
    for i in range(4):
        pre = f"base_model.model.llm.layers.{i}.self_attn"
        qkv = 2.0 * sd[f"{pre}.qkv_proj.lora_B.weight"] @ sd[f"{pre}.qkv_proj.lora_A.weight"]
        for name, delta in zip(("to_q", "to_k", "to_v"), qkv.chunk(3)):
            key = f"layers.{i}.self_attn.{name}.weight"
            assert torch.allclose(got[key], base[key] + delta, atol=1e-6), key
        o = 2.0 * sd[f"{pre}.o_proj.lora_B.weight"] @ sd[f"{pre}.o_proj.lora_A.weight"]
        key = f"layers.{i}.self_attn.to_out.0.weight"
        assert torch.allclose(got[key], base[key] + o, atol=1e-6), key


def _save_checkpoint(module, path: Path, ema: dict[str, torch.Tensor] | None) -> None:
    import lightning

    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(ckpt)
    if ema is not None:
        ckpt["ema_state_dict"] = ema
    torch.save(ckpt, path)


def test_checkpoint_loads_with_ema_weights_by_default(tmp_path, capsys):
    trained = _trained_tiny(lora_seed=1)
    ema_src = _trained_tiny(lora_seed=2)
    ema = {n: p.detach().clone() for n, p in ema_src.named_parameters() if p.requires_grad}
    _save_checkpoint(trained, tmp_path / "last.ckpt", ema)

    loaded = pipeline.load_module(checkpoint=str(tmp_path / "last.ckpt"))
    assert "EMA" in capsys.readouterr().out
    expected_ema = _expected_merged(ema_src)
    got = _weights(loaded)
    assert all(torch.allclose(got[k], expected_ema[k], atol=1e-6) for k in expected_ema)
    raw = _weights(pipeline.load_module(checkpoint=str(tmp_path / "last.ckpt"), use_ema=False))
    expected_raw = _expected_merged(trained)
    assert all(torch.allclose(raw[k], expected_raw[k], atol=1e-6) for k in expected_raw)


def test_cli_checkpoint_and_lora_run_end_to_end(tmp_path):
    trained = _trained_tiny(lora_seed=3)
    _save_checkpoint(trained, tmp_path / "c.ckpt", None)
    adapter = trained.save_adapter(tmp_path / "adapter")
    a, b = _write(tmp_path / "a.png", 8, 12), _write(tmp_path / "b.png", 8, 12, seed=1)
    common = ["--steps", "1", "--device", "cpu", "--image1", str(a), "--image2", str(b), "--task", "ivif"]
    assert main([*common, "--checkpoint", str(tmp_path / "c.ckpt"), "--output", str(tmp_path / "c.png")]) == 0
    assert main([*common, "--preset", "tiny", "--lora", str(adapter), "--output", str(tmp_path / "l.png")]) == 0
    c, lo = cv2.imread(str(tmp_path / "c.png")).astype(int), cv2.imread(str(tmp_path / "l.png")).astype(int)
    assert np.abs(c - lo).max() <= 1  # same weights either way
    assert main([*common, "--preset", "tiny", "--lora", str(adapter), "--checkpoint", str(tmp_path / "c.ckpt"),
                 "--output", str(tmp_path / "x.png")]) == 1


def test_model_folder_in_diffusers_layout(tmp_path):
    trained = _trained_tiny(lora_seed=4)
    from ditfuse.model.lora import merge_and_unload

    merge_and_unload(trained.backbone.transformer).save_pretrained(tmp_path / "model" / "transformer")
    a, b = _write(tmp_path / "a.png", 8, 12), _write(tmp_path / "b.png", 8, 12, seed=1)
    assert main(["--model", str(tmp_path / "model"), *RANDOM, "--image1", str(a), "--image2", str(b),
                 "--task", "mef", "--output", str(tmp_path / "o.png")]) == 0
    assert _hw(tmp_path / "o.png") == (8, 12)


# ---------------------------------------------------------------------------------------------
# `ditfuse predict`: sharded, each output written once
# ---------------------------------------------------------------------------------------------
def test_pair_batches_shard_every_pair_to_exactly_one_rank(tmp_path):
    root = _pairs_dir(tmp_path / "pairs")
    pairs, problems = find_pairs(root / "image1", root / "image2")
    assert [p.name for p in pairs] == ["a", "b", "c", "d"] and len(problems) == 2
    seen = []
    for rank in range(3):
        ds = PairBatches(pairs, make_prompt("ivif"), max_side=64, multiple=4, batch_size=2)
        ds.rank, ds.world_size = rank, 3
        for batch in ds:
            assert batch["images"].shape[0] == len(batch["key"]) <= 2
            seen += batch["key"]
    assert sorted(seen) == ["a", "b", "d"]  # c's partner is unreadable


def test_ditfuse_predict_writes_each_output_once_at_source_size(tmp_path, tiny_dir):
    from ditfuse.cli import main as ditfuse

    root = _pairs_dir(tmp_path / "pairs")
    out = tmp_path / "out"
    args = ["predict", "--config", str(Path(__file__).parents[1] / "configs" / "predict.yaml"),
            "--model.preset=tiny", f"--model.pretrained={tiny_dir}", "--model.val_sampler.steps=1", "--trainer.accelerator=cpu",
            "--trainer.precision=32-true", "--trainer.enable_progress_bar=false", f"--data.pairs_dir={root}",
            "--data.max_side=64", "--data.batch_size=2", "--data.num_workers=0",
            f"--trainer.callbacks.output_dir={out}"]
    assert ditfuse(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "d.png"]
    assert _hw(out / "a.png") == (12, 16)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite"):
        ditfuse(args)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_predict_matches_fuse_for_the_same_pair(tmp_path, fast, tiny_dir):
    import lightning as L

    from callbacks.prediction_writer import FusedImageWriter
    from datamodules.pairs import PairsDataModule
    from ditfuse.module import DiTFuseModule

    root = _pairs_dir(tmp_path / "pairs")
    model = DiTFuseModule(preset="tiny", pretrained=str(tiny_dir), val_sampler=SamplerSettings(steps=2))
    dm = PairsDataModule(pairs_dir=str(root), task="ivif", max_side=64, batch_size=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        callbacks=[FusedImageWriter(output_dir=str(tmp_path / "pred"))])
    trainer.predict(model, datamodule=dm, return_predictions=False)
    assert main([*fast, "--steps", "2", "--pairs-dir", str(root), "--task", "ivif", "--max-side", "64",
                 "--output-dir", str(tmp_path / "fuse")]) == 1  # c, lonely, e skipped
    for n in "abd":
        a = cv2.imread(str(tmp_path / "pred" / f"{n}.png")).astype(int)
        b = cv2.imread(str(tmp_path / "fuse" / f"{n}.png")).astype(int)
        assert np.abs(a - b).max() <= 1, n


def test_cli_solver_flags_are_checked_before_loading_and_fast_runs(tmp_path, capsys):
    a, b = _write(tmp_path / "a.png", 8, 8), _write(tmp_path / "b.png", 8, 8, seed=1)
    common = ["--preset", "tiny", "--device", "cpu", "--image1", str(a), "--image2", str(b), "--task", "ivif"]
    bad = [(["--fast", "--steps", "2"], "--fast sets the solver settings itself: drop --steps"),
           (["--official", "--solver", "heun"], "--official runs the original's Euler loop: drop --solver"),
           (["--guidance-interval", "0.8", "0.2"], "guidance_interval must be [t_lo, t_hi]")]
    for flags, message in bad:
        assert main([*common, *flags, "--output", str(tmp_path / "x.png")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    with pytest.raises(SystemExit):
        main([*common, "--solver", "rk9", "--output", str(tmp_path / "x.png")])
    assert "invalid choice: 'rk9'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main([*common, "--fast", "--output", str(tmp_path / "f.png")]) == 0
    assert _hw(tmp_path / "f.png") == (8, 8)
