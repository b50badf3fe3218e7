"""The `ditfuse` entry point as a new user meets it: one-line config errors naming the setting,
the nearest valid key for a typo, output folders checked before work, --version, a closed pipe,
no Lightning import for the plain tools, no `test` command that cannot work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditfuse.cli import main as ditfuse
from ditfuse.commands.lightning_cli import suggest_key

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def _fit_error(capsys, *args: str) -> str:
    """stderr of a `ditfuse fit` that must stop with exit status 2 before any work."""
    try:
        rc = ditfuse(["fit", "--config", DEMO, *args])
    except SystemExit as exc:  # the parser exits by itself
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_key_on_the_command_line_suggests_the_nearest_valid_key(capsys):
    err = _fit_error(capsys, "--data.ratio.m3=0.5")
    assert "did you mean --data.ratios.m3?" in err
    assert len(err.strip().splitlines()) <= 2  # the error and where to look, not 100 usage lines


def test_unknown_key_in_a_config_file_suggests_the_nearest_valid_key(capsys, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  ratio: {m3: 1.0}\n")
    assert "did you mean --data.ratios.m3?" in _fit_error(capsys, "--config", str(typo))


@pytest.mark.parametrize("arg, named", [("--data.image_size=30", "image_size"),
                                        ("--data.ratios.m3=-1", "ratios"),
                                        ("--model.optimizer.lr=-1", "lr"),
                                        ("--model.val_sampler.solver=rk9", "solver")])
def test_bad_values_are_one_line_naming_the_setting(capsys, tmp_path, arg, named):
    t0 = time.time()
    err = _fit_error(capsys, f"--trainer.default_root_dir={tmp_path}", arg)
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and named in lines[0]
    assert time.time() - t0 < 120  # before any model is built or shard read
    assert not any(tmp_path.iterdir())


def test_suggest_key_keeps_the_depth_and_the_tail():
    known = ["data.ratios", "data.batch_size", "trainer.max_steps", "model.optimizer.lr"]
    assert suggest_key("data.ratio.m3", known) == "data.ratios.m3"
    assert suggest_key("data.batchsize", known) == "data.batch_size"
    assert suggest_key("model.optimizer.lrr", known) == "model.optimizer.lr"
    assert suggest_key("data.ratios.m3x", known) is None  # the prefix is valid: no guess
    assert suggest_key("zzz", known) is None


def test_unwritable_run_folder_fails_before_work(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _fit_error(capsys, f"--trainer.default_root_dir={blocker / 'run'}")
    assert "trainer.default_root_dir" in err and "not writable" in err


def test_version_help_and_no_test_command(capsys):
    from ditfuse import __version__

    assert ditfuse(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ditfuse {__version__}"
    assert ditfuse(["-h"]) == 0
    usage = capsys.readouterr().out
    assert "  fit " in usage and "  test " not in usage
    assert ditfuse(["test"]) == 2
    assert "ditfuse validate" in capsys.readouterr().err


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_the_entry_point_imports_neither_torch_nor_lightning():
    """`ditfuse shards --help` must not pay for the model stack: cli.py imports it only for
    fit/validate/predict (ditfuse/commands/shards.py must be lazy too, issue 9)."""
    res = _run("import sys; from ditfuse.cli import main; main(['--version']); "
               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')))")
    assert res.returncode == 0 and res.stdout.strip().endswith("[]"), res.stderr


def test_the_hub_is_off_before_the_model_stack_imports_and_its_import_noise_is_gone():
    """Weights come from local paths only, so `ditfuse` switches the Hub off before anything
    imports huggingface_hub (which reads HF_HUB_OFFLINE once): bitsandbytes, pulled in by peft,
    asks the Hub for a CPU kernel at import on AVX512-bf16 CPUs and logs two lines about it."""
    code = ("import contextlib, io; from ditfuse.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['fit', '--help'])\n"
            "import bitsandbytes, huggingface_hub.constants as hub\n"
            "print(hub.HF_HUB_OFFLINE)")
    res = _run(code)  # _run's environment has no HF_HUB_OFFLINE
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"
    assert "kernels-community" not in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_hub_setting_the_caller_chose_is_kept(monkeypatch):
    import logging

    from ditfuse import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cli.prepare_process()
    cli.prepare_process()  # once per process in effect: the filters are not stacked
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    for name, noise in cli.IMPORT_NOISE.items():
        assert logging.getLogger(name).filters.count(noise) == 1
        kept = logging.LogRecord(name, logging.WARNING, __file__, 1, "another warning", None, None)
        dropped = logging.LogRecord(name, logging.WARNING, __file__, 1, noise.start + ": details", None, None)
        assert noise.filter(kept) and not noise.filter(dropped)


def test_closed_pipe_is_not_a_traceback():
    """`ditfuse -h | head`: the reader leaves; the writer ends quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: every write fails with EPIPE
    code = "import sys, ditfuse.cli as c; c._usage = lambda: 'usage line\\n' * 20000; sys.exit(c.main(['-h']))"
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                             text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    finally:
        os.close(write_end)
    assert res.returncode == 1 and res.stderr == "", res.stderr


ABBREVIATED = {  # subcommand argv with one abbreviated option -> the option it abbreviates
    "fit": (["fit", "--config", DEMO, "--trainer.max_step=5"], "--trainer.max_steps"),
    "validate": (["validate", "--config", DEMO, "--data.batch_siz=5"], "--data.batch_size"),
    "predict": (["predict", "--config", str(ROOT / "configs" / "predict.yaml"), "--model.prese=tiny"],
                "--model.preset"),
    "fuse": (["fuse", "--pairs", "x"], "--pairs-dir"),
    "eval": (["eval", "--image1-dir", "a", "--image2-dir", "b", "--fused", "c"], "--fused-dir"),
    "convert": (["convert", "model", "--src", "a", "--out", "b", "--overwr"], "--overwrite"),
    "shards": (["shards", "inspect", "p", "--max-sample", "3"], "--max-samples"),
    "sweep": (["sweep", "--config", DEMO, "--grid-fil", "g.yaml"], "--grid-file"),
}


@pytest.mark.parametrize("command", sorted(ABBREVIATED))
def test_an_abbreviated_option_is_an_error_with_did_you_mean(command, capsys):
    """argparse's prefix matching (`--trainer.max_step=5` taken as max_steps) is off everywhere."""
    argv, full = ABBREVIATED[command]
    try:
        rc = ditfuse(argv)
    except SystemExit as exc:  # the parser exits by itself (convert returns its status)
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and f"did you mean {full}" in err, err[-1000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
