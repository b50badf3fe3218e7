"""A checkpoint written before the issue-20 move (ditfuse/ in 22 flat files, main at 06ecf89)
still loads and fuses as it did.

tests/data/pre_move/ was made with the pre-move code (27 KB: a 1-layer, hidden-32 `tiny` with a
rank-2 LoRA and EMA, two steps of the demo):

    ditfuse fit --config configs/demo.yaml --model.model_overrides '{hidden_size: 32, num_layers: 1,
        num_attention_heads: 1, num_key_value_heads: 1, intermediate_size: 64, pos_embed_max_size: 16}'
        --model.lora '{r: 2, alpha: 2.0}' --trainer.callbacks+=callbacks.EMA --trainer.callbacks.decay=0.5
        --trainer.max_steps 2 --data.batches_per_epoch 2 --data.batch_size 2 --data.val_batch_size 2
        --data.val_samples_per_task 1                                   # -> last.ckpt
    ditfuse fuse --checkpoint last.ckpt --image1 vis.png --image2 ir.png --task ivif --steps 2 \
        --output fused_old.png

No module path needs mapping at load time: the module saves its settings as plain dicts, so a
checkpoint pickles no project class (it loads with `weights_only=True`, checked below).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditfuse.cli import main as ditfuse
from ditfuse.core.images import read_image
from ditfuse.module import DiTFuseModule

DATA = Path(__file__).resolve().parent / "data" / "pre_move"
CKPT = DATA / "last.ckpt"


def test_pre_move_checkpoint_pickles_no_project_class():
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)  # raises on any pickled class
    assert ckpt["hyper_parameters"]["lora"] == {"r": 2, "alpha": 2.0, "dropout": 0.0,
                                                "targets": ["to_q", "to_k", "to_v", "to_out.0"]}
    assert len(ckpt["ema_state_dict"]) == len(ckpt["state_dict"]) == 8


def test_pre_move_checkpoint_loads_as_the_lightning_module():
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    module = DiTFuseModule.from_checkpoint(CKPT, map_location="cpu")
    state = module.state_dict()
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(state[key], value), key
    assert module.preset.hidden_size == 32 and module.preset.num_layers == 1


def test_pre_move_checkpoint_fuses_as_before(tmp_path):
    out = tmp_path / "fused.png"
    assert ditfuse(["fuse", "--checkpoint", str(CKPT), "--image1", str(DATA / "vis.png"), "--image2",
                    str(DATA / "ir.png"), "--task", "ivif", "--steps", "2", "--output", str(out)]) == 0
    new, old = read_image(out), read_image(DATA / "fused_old.png")
    assert new.shape == old.shape == (32, 48, 3)
    assert np.abs(new.astype(np.int16) - old.astype(np.int16)).max() <= 1  # 1/255: another CPU's rounding
