"""callbacks.progress.StepLog: a line every N optimizer steps (and after validation) when stdout
is not a terminal, with the rate and ETA of this process's steps (a resumed run starts at k)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from callbacks.progress import StepLog


def _trainer(step: int, **kw) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=100, current_epoch=0, callback_metrics={"train/loss": 0.25},
                           progress_bar_callback=None, sanity_checking=False, **kw)


def test_a_line_every_n_steps_with_rate_and_eta(capsys, monkeypatch):
    log = StepLog(every_n_steps=10)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    log.on_train_start(_trainer(40), None)  # resumed at step 40
    clock = iter([10.0])
    monkeypatch.setattr("callbacks.progress.time.perf_counter", lambda: next(clock, 10.0))
    log._t0 = 0.0
    for step in range(41, 61):
        log.on_train_batch_end(_trainer(step))
        log.on_train_batch_end(_trainer(step))  # gradient accumulation: same step, no second line
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[step 50/100] epoch 0 | train/loss 0.25 | 1.00 steps/s | ETA 0:00:50",
                     "[step 60/100] epoch 0 | train/loss 0.25 | 2.00 steps/s | ETA 0:00:20"]


def test_silent_in_a_terminal_unless_always(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    StepLog(every_n_steps=1).on_train_batch_end(_trainer(5))
    assert capsys.readouterr().out == ""
    log = StepLog(every_n_steps=1, always=True)
    log.on_train_start(_trainer(0), None)
    log.on_train_batch_end(_trainer(5))
    assert capsys.readouterr().out.startswith("[step 5/100]")


def test_turns_the_bar_off_without_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    bar = SimpleNamespace(disabled=False)
    bar.disable = lambda: setattr(bar, "disabled", True)
    trainer = _trainer(0)
    trainer.progress_bar_callback = bar
    StepLog().setup(trainer, None, "fit")
    assert bar.disabled


def test_rejects_a_zero_period():
    with pytest.raises(ValueError, match="every_n_steps"):
        StepLog(every_n_steps=0)
