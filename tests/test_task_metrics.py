"""Segmentation and control scores used by the validation callbacks."""

from __future__ import annotations

import torch

from ditfuse.eval.task_metrics import SEG_ALPHA, binary_miou, control_accuracy, recover_overlay_mask


def _overlay(base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    blue = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    painted = (1 - SEG_ALPHA) * base + SEG_ALPHA * blue
    return torch.where(mask[:, None], painted, base)


def test_overlay_mask_recovered_exactly_from_the_target():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 3, 24, 24, generator=g)
    mask = torch.rand(3, 24, 24, generator=g) > 0.6
    pred = recover_overlay_mask(_overlay(base, mask), base)
    assert torch.equal(pred, mask)
    assert torch.allclose(binary_miou(pred, mask), torch.ones(3))


def test_miou_of_known_masks():
    true = torch.zeros(1, 4, 4, dtype=torch.bool)
    true[0, :2] = True  # top half
    pred = torch.zeros_like(true)
    pred[0, :, :2] = True  # left half: fg IoU 4/12, bg IoU 4/12
    assert torch.allclose(binary_miou(pred, true), torch.tensor([1 / 3]))
    # nothing to segment and nothing predicted: perfect
    empty = torch.zeros_like(true)
    assert torch.allclose(binary_miou(empty, empty), torch.tensor([1.0]))


def test_control_accuracy_direction_and_amount():
    base = torch.full((4, 3, 8, 8), 0.4)
    base[:, :, :, :4] = 0.2  # some contrast to change
    brighter = base ** 0.75  # LIGHT+
    darker = base ** 1.35  # LIGHT-
    subtasks = ["LIGHT+", "LIGHT+", "LIGHT-", "LIGHT+"]
    target = torch.stack([brighter[0], brighter[1], darker[2], brighter[3]])
    output = torch.stack([brighter[0],  # exact: right
                          base[1],      # unchanged: wrong
                          darker[2],    # exact: right
                          darker[3]])   # wrong direction
    acc = control_accuracy(output, base, target, subtasks)
    assert acc.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_control_accuracy_contrast_uses_spread_not_mean():
    base = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    mean = base.mean(dim=(1, 2, 3), keepdim=True)
    more = (mean + 1.4 * (base - mean)).clamp(0, 1)
    brighter_only = base + 0.1  # mean moves, spread does not
    acc = control_accuracy(torch.stack([more[0], brighter_only[1]]), base,
                           torch.stack([more[0], more[1]]), ["CONTRAST+", "CONTRAST+"])
    assert acc.tolist() == [1.0, 0.0]
