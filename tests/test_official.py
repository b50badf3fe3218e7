"""Official DiTFuse inference parity (issue 11) and the `ditfuse fuse` extras of issue 12.

- the released folders (stand-ins built as the release lays them out, tests/_release.py): the
  tokenizer loads from the original-layout OmniGen-v1 folder; `ditfuse fuse --model --lora` runs
  offline in both modes;
- prompts equal the published ones in ../shared/docs/PROMPTS.md (skipped when ../shared is absent);
- the negative prompt of the unconditional branch, `<cfg>` for the training drop-all rows;
- `--official`: test.py's resize rule on the TNO/RoadScene sizes, its defaults per mode, bf16
  casts, device noise, uint8 by truncation;
- folder-mode progress, `--sheet`, the writable-output check before the model loads;
- the core reads pairs without importing datamodules.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from _release import RELEASE_PHI3, write_release

from ditfuse.core import prompts as P
from ditfuse.model.conditioning import NEGATIVE_PROMPT, PREFIX, SUFFIX, tokenize_multimodal
from ditfuse.commands.fuse import (
    main,
    parser,
    sampler_settings,
)
from ditfuse.pipeline import resolve_dtype
from ditfuse.interop.pairs import official_size, prepare_official, processor_crop, restore
from ditfuse.sampling.sampler import SamplerSettings, euler, initial_noise
from ditfuse.model.tokenizer import load_tokenizer
from test_inference import tiny_dir  # noqa: F401  (fixture: tiny model with non-zero output layers)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_MD = ROOT.parent / "shared" / "docs" / "PROMPTS.md"  # as conftest's SHARED_IVIF
FAST = ["--steps", "1", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    return write_release(tmp_path_factory.mktemp("release"))


def _write(path: Path, h: int, w: int, seed: int = 0, channels: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, channels) if channels > 1 else (h, w)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


def _hw(path: Path) -> tuple[int, int]:
    return tuple(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[:2])


# ---------------------------------------------------------------------------------------------
# The released folders
# ---------------------------------------------------------------------------------------------
def test_tokenizer_loads_from_the_original_layout_folder(release):
    model, _ = release
    cfg = (model / "config.json").read_text()
    assert '"type": "su"' in cfg and '"model_type": "phi3"' in cfg  # the file that broke AutoTokenizer
    tok = load_tokenizer(model)
    assert tok.vocab_size == RELEASE_PHI3["vocab_size"]
    ids, spans, _ = tokenize_multimodal(tok, P.default_prompt("ivif"), 2, tokens_per_image=4)
    assert ids[0] == tok.bos_token_id == 1 and len(spans) == 2
    assert tok.decode(tok.encode(NEGATIVE_PROMPT, add_bos=False)) == NEGATIVE_PROMPT
    # ids exactly as the file's own pipeline gives them (what transformers 4.45, the original's,
    # does; transformers 5's LlamaTokenizer drops the "▁" after special tokens such as <|user|>)
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    for text in (PREFIX + P.default_prompt("m3").split("<img>")[0], PREFIX + NEGATIVE_PROMPT + SUFFIX):
        assert tok.encode(text) == raw.encode(text).ids


@pytest.mark.parametrize("official", [False, True], ids=["default", "official"])
def test_fuse_with_the_released_folders_runs_offline(release, tmp_path, official, capsys):
    model, lora = release
    a, b = _write(tmp_path / "vi.png", 30, 40), _write(tmp_path / "ir.png", 30, 40, seed=1, channels=1)
    out = tmp_path / "fused.png"
    argv = ["--model", str(model), "--lora", str(lora), "--image1", str(a), "--image2", str(b), "--task", "ivif",
            "--output", str(out), "--max-side", "64", *FAST] + (["--official"] if official else [])
    assert main(argv) == 0, capsys.readouterr().err
    assert "official DiTFuse format" in capsys.readouterr().out
    # official: long side set to 64 (upscaled), 30x40 -> 48x64; default: the source size
    assert _hw(out) == ((48, 64) if official else (30, 40))


# ---------------------------------------------------------------------------------------------
# Prompts, verbatim from ../shared/docs/PROMPTS.md
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published() -> dict[str, str]:
    if not PROMPTS_MD.is_file():
        pytest.skip("../shared/docs/PROMPTS.md is absent (fresh clone)")
    text = PROMPTS_MD.read_text(encoding="utf-8")
    i_text = re.search(r"`I` stands for\s+`([^`]+)`", text).group(1)
    r_text = re.search(r"and `R` for `([^`]+)`", text).group(1)
    rows = dict(re.findall(r"^\| ([A-Z0-9+ ]+) \| `([^`]+)`", text, flags=re.MULTILINE))
    expand = lambda s: s.replace(" I ", f" {i_text} ").replace(" R ", f" {r_text} ")
    out = {k: expand(v) for k, v in rows.items()}
    out["negative"] = re.search(r"negative_prompt`\), exactly:\s+`([^`]+)`", text).group(1)
    out["wrapper"] = re.search(r"OmniGen wraps every prompt as `([^`]+)`", text).group(1)
    return {k: " ".join(v.split()) for k, v in out.items()}  # the markdown's own line wrapping


@pytest.mark.parametrize("row,task,kw", [
    ("IVIF", "ivif", {}), ("MFF", "mff", {}), ("MEF", "mef", {}), ("M3", "m3", {}),
    ("CONTROL LIGHT+", "control", {"subtask": "LIGHT+"}), ("SEG", "seg", {"cls": "tree"})])
def test_default_prompts_equal_the_published_ones(published, row, task, kw):
    assert P.default_prompt(task, **kw) == published[row]


def test_published_instructions_come_first_in_every_pool(published):
    for row, task in (("IVIF", "ivif"), ("MFF", "mff"), ("MEF", "mef"), ("M3", "m3")):
        assert published[row].endswith(" " + P.INSTRUCTIONS[task][0])
    assert published["CONTROL LIGHT+"].endswith(" " + P.CONTROL_INSTRUCTIONS["LIGHT+"][0])
    assert published["SEG"].endswith(" " + P.INSTRUCTIONS["seg"][0].format(cls="tree"))
    # the requirements phrase is in every published example but IVIF's
    assert (P.REQUIREMENTS in published["IVIF"]) is False and P.REQUIREMENTS in published["MFF"]


def test_negative_prompt_and_wrapper_equal_the_published_ones(published):
    assert NEGATIVE_PROMPT == published["negative"]
    assert (PREFIX + "{prompt}" + SUFFIX).replace("\n", "\\n") == published["wrapper"]


# ---------------------------------------------------------------------------------------------
# Negative prompt and the training drop-all row
# ---------------------------------------------------------------------------------------------
def test_unconditional_branch_uses_the_negative_prompt_without_images():
    from ditfuse.model.backbone import Backbone, build_transformer
    from ditfuse.model.config import ModelConfig
    from ditfuse.sampling.sampler import GuidedVelocity
    from ditfuse.model.tokenizer import BuiltinTokenizer

    tok, bb = BuiltinTokenizer(), Backbone(build_transformer(ModelConfig.from_name("tiny", num_layers=1)))
    lat = torch.zeros(1, 2, 12, 4, 4)
    for text in (NEGATIVE_PROMPT, "blurry"):
        g = GuidedVelocity(bb, tok, [P.default_prompt("m3")], lat, (4, 4), 2.0, 1.6, batch_branches=False,
                           negative_prompt=text)
        ids, _, _ = tokenize_multimodal(tok, text, 0, 4)
        u = g.conds["u"]
        assert u.input_ids[0].tolist() == ids and u.span_row.numel() == 0  # no images
    assert SamplerSettings().negative_prompt == NEGATIVE_PROMPT


def test_negative_prompt_option_reaches_the_sampler_and_changes_the_output(tiny_dir, tmp_path):
    a, b = _write(tmp_path / "a.png", 16, 16), _write(tmp_path / "b.png", 16, 16, seed=1)
    args = parser().parse_args(["--negative-prompt", "blurry", "--image1", "x", "--image2", "y"])
    assert sampler_settings(args).negative_prompt == "blurry"
    outs = {}
    for text in (None, "blurry"):
        out = tmp_path / f"{text}.png"
        extra = [] if text is None else ["--negative-prompt", text]
        assert main(["--model", str(tiny_dir), "--preset", "tiny", "--image1", str(a), "--image2", str(b),
                     "--task", "ivif", "--output", str(out), *FAST, *extra]) == 0
        outs[text] = cv2.imread(str(out)).astype(int)
    assert np.abs(outs[None] - outs["blurry"]).max() > 0


def test_training_drop_all_rows_take_cfg_without_images_by_default():
    from ditfuse.module import DiTFuseModule, FlowSettings

    m = DiTFuseModule(preset="tiny", model_overrides={"num_layers": 1}, flow=FlowSettings(p_text=0.0, p_all=1.0))
    assert m._dropout_prompts(["a", "b"]) == (["<cfg>", "<cfg>"], [0, 0])
    m.flow_settings = FlowSettings(p_text=0.0, p_all=1.0, drop_all_prompt="")
    assert m._dropout_prompts(["a"]) == ([""], [0])


# ---------------------------------------------------------------------------------------------
# --official: test.py's sizes, defaults and numerics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wh,expected", [((768, 576), (1024, 768)), ((575, 475), (1024, 832)),
                                         ((546, 265), (1024, 496))], ids=["TNO", "RoadScene", "RoadScene-wide"])
def test_official_resize_rule_on_tno_roadscene_sizes(wh, expected):
    (w, h), (ew, eh) = wh, expected
    assert official_size(h, w, 1024) == (eh, ew)
    pair = prepare_official(np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8))
    assert tuple(pair.images.shape[-2:]) == (eh, ew) == pair.original_hw and pair.truncate


def test_official_rule_goes_down_too_and_leaves_exact_sizes_untouched():
    assert official_size(1500, 2000, 1024) == (768, 1024)  # 2000 -> 1024, 768 exactly
    assert official_size(5, 40, 64) == (16, 64)  # at least 16
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)
    pair = prepare_official(a, a, max_side=64)
    assert torch.equal(pair.images[0], (torch.from_numpy(a).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)


def test_processor_crop_is_a_no_op_at_test_py_sizes_and_limits_larger_inputs():
    from PIL import Image

    img = Image.new("RGB", (1024, 768))
    assert processor_crop(img).size == (1024, 768)
    big = processor_crop(Image.new("RGB", (1600, 1000)))  # --max-side 1600: inputs back to 1024
    assert big.size == (1024, 640)
    pair = prepare_official(np.zeros((500, 800, 3), np.uint8), np.zeros((500, 800, 3), np.uint8), max_side=1600)
    # 800x500 -> 1600x1000 -> 1600x992 output; inputs 1024x635 (BICUBIC) -> centre crop 1024x624
    assert pair.original_hw == (992, 1600) and pair.sample_hw == (992, 1600)
    assert tuple(pair.images.shape[-2:]) == (624, 1024)


def test_real_pairs_get_the_official_sizes(ivif_dir):
    from ditfuse.core.images import read_image
    from ditfuse.interop.pairs import IMAGE_EXTS

    known = {(576, 768): (768, 1024), (475, 575): (832, 1024), (265, 546): (496, 1024)}
    seen = set()
    for path in sorted(p for p in ivif_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:400]:
        hw = read_image(path).shape[:2]
        if hw in known and hw not in seen:
            seen.add(hw)
            assert official_size(*hw, 1024) == known[hw], path
    assert seen, "no TNO/RoadScene image of the known sizes found"


@pytest.mark.parametrize("mode,argv,expected", [
    ("single", ["--image1", "a", "--image2", "b"], (2.0, 1.6, 0)),
    ("folder", ["--pairs-dir", "d"], (2.0, 1.6, 3047)),
    ("prompt-file", ["--image1", "a", "--image2", "b", "--prompt-file", "p"], (2.5, 2.0, 42))])
def test_official_flags_take_test_py_defaults_per_mode(mode, argv, expected):
    s = sampler_settings(parser().parse_args(["--official", *argv]))
    assert (s.guidance_scale, s.img_guidance_scale, s.seed) == expected
    assert (s.noise, s.state, s.steps, s.negative_prompt) == ("device", "model", 50, NEGATIVE_PROMPT)
    plain = sampler_settings(parser().parse_args(argv))
    assert (plain.guidance_scale, plain.img_guidance_scale, plain.seed) == (2.5, 1.6, 0)
    assert (plain.noise, plain.state) == ("cpu", "float32")
    given = sampler_settings(parser().parse_args(["--official", "--guidance-scale", "3", "--seed", "7", *argv]))
    assert (given.guidance_scale, given.seed) == (3.0, 7)
    assert resolve_dtype("auto", torch.device("cpu"), official=True) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp32", torch.device("cpu"), official=True) == torch.float32


def test_uint8_by_truncation():
    y = torch.tensor([0.0, 0.999]).view(1, 1, 2).expand(3, 1, 2)  # model output in [-1, 1]
    # * 0.5 + 0.5, * 255: 127.5 and 254.87 levels
    assert restore(y, (1, 2), (1, 2), truncate=True)[0, :, 0].tolist() == [127, 254]
    assert restore(y, (1, 2), (1, 2))[0, :, 0].tolist() == [128, 255]


def test_official_noise_is_the_pipelines_draw():
    # OmniGenPipeline: torch.randn(num_prompt, 4, h, w, device=d, generator=torch.Generator(d).manual_seed(s))
    shape = (4, 6, 8)
    want = torch.randn(1, *shape, device="cpu", generator=torch.Generator("cpu").manual_seed(3))
    got = initial_noise((2, *shape), 3, "cpu", on_device=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[0])  # one generator per row


def test_official_euler_keeps_state_and_timesteps_in_the_model_dtype():
    seen = []

    def velocity(x, t):
        seen.append((x.dtype, t.dtype, t[0].item()))
        return torch.ones_like(x)

    x = euler(velocity, torch.zeros(1, 2), 3, state_dtype=torch.bfloat16)
    assert x.dtype == torch.bfloat16 and all(xd == td == torch.bfloat16 for xd, td, _ in seen)
    assert [round(t, 2) for *_, t in seen] == [0.0, 0.33, 0.67]
    assert euler(velocity, torch.zeros(1, 2), 3).dtype == torch.float32


def test_official_bf16_run_differs_little_from_fp32(tiny_dir, tmp_path):
    a, b = _write(tmp_path / "a.png", 24, 32), _write(tmp_path / "b.png", 24, 32, seed=1)
    outs = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.png"
        assert main(["--model", str(tiny_dir), "--preset", "tiny", "--image1", str(a), "--image2", str(b),
                     "--task", "ivif", "--output", str(out), "--official", "--max-side", "64", "--steps", "2",
                     "--device", "cpu", "--dtype", dtype]) == 0
        outs[dtype] = cv2.imread(str(out)).astype(int)
    assert outs["fp32"].shape == (48, 64, 3)
    diff = np.abs(outs["fp32"] - outs["bf16"])
    assert 0 < diff.max() <= 32, diff.max()  # bf16 rounding, not a different image


# ---------------------------------------------------------------------------------------------
# Folder mode: progress, --sheet, the output check before loading
# ---------------------------------------------------------------------------------------------
def _pairs(root: Path, n: int = 2) -> Path:
    for i in range(n):
        _write(root / "image1" / f"p{i}.png", 16, 20, seed=i)
        _write(root / "image2" / f"p{i}.png", 16, 20, seed=10 + i, channels=1)
    return root


def test_folder_progress_line_without_a_terminal_and_bar_on_one(tiny_dir, tmp_path, capsys, monkeypatch):
    pairs = _pairs(tmp_path / "pairs")
    base = ["--model", str(tiny_dir), "--preset", "tiny", "--pairs-dir", str(pairs), "--task", "mff", *FAST]
    assert main([*base, "--output-dir", str(tmp_path / "o1")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[1/2\] .*p0\.png .*ETA \d\d:\d\d", out) and "[2/2]" in out
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main([*base, "--output-dir", str(tmp_path / "o2")]) == 0
    cap = capsys.readouterr()
    assert "2/2" in cap.err and "pair" in cap.err and "[1/2]" not in cap.out  # the tqdm bar
    assert main([*base, "--output-dir", str(tmp_path / "o3"), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "[2/2]" in cap.out and "2/2 [" not in cap.err


def test_sheet_shows_inputs_and_outputs_side_by_side(tiny_dir, tmp_path):
    pairs = _pairs(tmp_path / "pairs")
    sheet = tmp_path / "sheet.png"
    assert main(["--model", str(tiny_dir), "--preset", "tiny", "--pairs-dir", str(pairs), "--task", "mff",
                 "--output-dir", str(tmp_path / "out"), "--sheet", str(sheet), *FAST]) == 0
    img = cv2.imread(str(sheet))
    # two rows of (28 px label + 256 px tiles + 4 px gap); three 256x320 tiles + two gaps
    assert img.shape == (2 * (28 + 256 + 4), 3 * 320 + 8, 3)
    fused = cv2.imread(str(tmp_path / "out" / "p0.png"))
    tile = cv2.resize(fused, (320, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(img[28:28 + 256, 648:968].astype(int) - tile.astype(int)).max() == 0
    assert img[:28].min() < 128  # the label is written


def test_unwritable_output_folder_fails_before_the_model_loads(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    a, b = _write(tmp_path / "a.png", 8, 8), _write(tmp_path / "b.png", 8, 8)
    # a model path that does not exist: the output check must fire first
    rc = main(["--model", str(tmp_path / "no-model"), "--image1", str(a), "--image2", str(b), "--task", "ivif",
               "--output-dir", str(blocker / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "is a file, not a folder" in err and err.count("\n") == 1


def test_core_reads_pairs_without_importing_datamodules():
    """Nor the model stack: `ditfuse fuse --help` and its argument errors come before Lightning and
    diffusers load (3 s instead of 14 s on a 2-core VM)."""
    code = ("import sys, ditfuse.commands.fuse, ditfuse.interop.pairs, ditfuse.core.images; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('datamodules', 'callbacks', 'lightning', "
            "'diffusers')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    import ditfuse.interop.pairs as core
    from datamodules import io, pairs

    assert pairs.find_pairs is core.find_pairs and io.read_image.__module__ == "ditfuse.core.images"


def test_shipped_configs_spell_out_the_negative_prompt_and_cfg():
    import yaml

    from ditfuse.module import FlowSettings

    for name in ("omnigen_lora.yaml", "predict.yaml"):
        model = yaml.safe_load((ROOT / "configs" / name).read_text())["model"]
        assert SamplerSettings(**model["val_sampler"]).negative_prompt == NEGATIVE_PROMPT, name
    flow = yaml.safe_load((ROOT / "configs" / "omnigen_lora.yaml").read_text())["model"]["flow"]
    assert FlowSettings(**flow).drop_all_prompt == "<cfg>"
