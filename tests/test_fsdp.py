"""FSDP on CPU with 2 gloo processes: one unit per OmniGenBlock, the same loss and gradients as the
unwrapped model (full fine-tune and LoRA), FSDP1 (use_orig_params, what Lightning's FSDPStrategy
builds) and FSDP2 (fully_shard, what ModelParallelStrategy's configure_model uses).

Lightning's FSDPStrategy itself needs CUDA; these tests drive torch's FSDP directly with the wrap
and checkpoint policies the cluster recipe names (configs/cluster/fsdp_a100.yaml).
"""

from __future__ import annotations

import datetime
import functools
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _fit import free_port
from diffusers.models.transformers.transformer_omnigen import OmniGenBlock
from torch import nn

from ditfuse.core import prompts as P
from ditfuse.model.backbone import DiTFuseBlock
from ditfuse.model.lora import LoraSettings
from ditfuse.module import DiTFuseModule
from ditfuse.sampling.sampler import SamplerSettings

# one worker runs the whole module: every case shares the module's 2-process group (fsdp_results)
pytestmark = pytest.mark.xdist_group("fsdp")
LAYERS = 2
TOL = 1e-5


def _batch(tasks=("m3", "ivif", "seg"), size=16) -> dict:
    g = torch.Generator().manual_seed(0)
    B = len(tasks)
    return {"task": list(tasks), "prompt": [P.default_prompt(t, cls="circle") for t in tasks],
            "images": torch.rand(B, 2, 3, size, size, generator=g) * 2 - 1,
            "target": torch.rand(B, 3, size, size, generator=g) * 2 - 1, "key": [str(i) for i in range(B)]}


def _model(lora: bool, checkpointing: bool = False) -> DiTFuseModule:
    settings = LoraSettings(r=4, alpha=4.0, dropout=0.0, targets=["to_q", "to_k", "to_v", "to_out.0"]) if lora else None
    model = DiTFuseModule(preset="tiny", model_overrides={"num_layers": LAYERS}, lora=settings,
                          gradient_checkpointing=checkpointing,
                          val_sampler=SamplerSettings(steps=2, guidance_scale=1.0, img_guidance_scale=1.0))
    # OmniGen's init zeroes the output layers (and peft zeroes lora_B): no gradient would reach the
    # blocks, so "gradients flow" would hold trivially. Give them small random values.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith(("backbone.transformer.norm_out.", "backbone.transformer.proj_out.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


class _Loss(nn.Module):
    """Root module for FSDP: the loss (and the KV-cached sampler) of the DiTFuseModule inside."""

    def __init__(self, model: DiTFuseModule) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict, sample: bool = False) -> torch.Tensor:
        if sample:
            return self.model.sample(batch, seed=[0, 1, 2])
        return self.model.flow_loss(batch, dropout=False, seeds=[10, 11, 12]).mean()


def _reference(lora: bool) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    model = _model(lora)
    loss = _Loss(model)(_batch())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, _Loss(model)(_batch(), sample=True)


def _fsdp1(model: DiTFuseModule, activation_checkpointing: bool) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    # what Lightning's FSDPStrategy(auto_wrap_policy={OmniGenBlock}, activation_checkpointing_policy=
    # {OmniGenBlock}) does: checkpoint-wrap the blocks, then one FSDP unit per block + the root
    if activation_checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, OmniGenBlock))
    root = FSDP(_Loss(model), auto_wrap_policy=ModuleWrapPolicy({OmniGenBlock}), use_orig_params=True,
                device_id=torch.device("cpu"))
    units = [m for m in root.modules() if isinstance(m, FSDP)]
    blocks = [u for u in units if any(isinstance(c, DiTFuseBlock) for c in u.module.modules())][1:]
    assert len(units) == LAYERS + 1 and len(blocks) == LAYERS, "one FSDP unit per block + the root"
    return root


def _fsdp2(model: DiTFuseModule) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.backbone.transformer.layers:
        fully_shard(block)
    root = _Loss(model)
    fully_shard(root)
    return root


def _full_grads(root: nn.Module, flavour: str) -> dict[str, torch.Tensor]:
    if flavour == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(root, with_grads=True):
            return {_clean(n): p.grad.clone() for n, p in root.named_parameters() if p.requires_grad}
    return {_clean(n): p.grad.full_tensor() for n, p in root.named_parameters() if p.requires_grad}


def _clean(name: str) -> str:
    """A wrapped parameter's name as the unwrapped DiTFuseModule names it."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name.removeprefix("model.")


def _equivalence(rank: int, flavour: str, lora: bool, checkpointing: str) -> dict:
    """One case: the wrapped model's loss, gradients and KV-cached sample against the unwrapped one."""
    ref_loss, ref_grads, ref_sample = _reference(lora)
    model = _model(lora, checkpointing=checkpointing == "model")
    root = _fsdp1(model, checkpointing == "policy") if flavour == "fsdp1" else _fsdp2(model)
    loss = root(_batch())  # both ranks: the same batch, so the averaged gradient is the reference
    loss.backward()
    grads = _full_grads(root, flavour)
    with torch.no_grad():
        sample = root(_batch(), sample=True)  # prefill + KV-cached steps through the units
    if rank != 0:
        return {}
    ref = ref_grads
    return {"loss": (loss.item(), ref_loss), "sample": (sample - ref_sample).abs().max().item(),
            "names": (sorted(grads), sorted(ref)),
            "grad": max((grads[n] - ref[n]).abs().max().item() / (ref[n].abs().max().item() + 1e-12)
                        for n in ref if n in grads),
            "nonzero": min(grads[n].abs().sum().item() for n in grads),
            "zero": [n for n in grads if not grads[n].abs().sum()],
            "worst": max(((grads[n] - ref[n]).abs().max().item(), ref[n].abs().max().item(), n)
                         for n in ref if n in grads)}


def _worker(rank: int, port: int, cases: list, folder: str, result: dict) -> None:
    """Every case in one process group: the 2 spawned interpreters start once for the module (the
    start-up, not the cases, is most of the time). A case that raises on rank 0 is reported as
    that case's failure; the others still run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a case that fails on one rank only leaves the other in a collective: the timeout ends it
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        for case in cases:
            try:
                if case[0] == "sharded":
                    out = _sharded(rank, case[1], str(Path(folder) / _case_id(case)))
                else:
                    out = _equivalence(rank, *case)
            except Exception as e:  # noqa: BLE001 - reported to the test of this case
                out = {"error": f"rank {rank}: {type(e).__name__}: {e}"}
                if rank != 0:
                    result[_case_id(case) + f"/rank{rank}"] = out
            if rank == 0:
                result[_case_id(case)] = out
            dist.barrier()
    finally:
        dist.destroy_process_group()


CASES = [("fsdp1", False, "none"), ("fsdp1", True, "none"), ("fsdp1", True, "model"), ("fsdp1", True, "policy"),
         ("fsdp2", False, "none"), ("fsdp2", True, "none"), ("sharded", False), ("sharded", True)]


def _case_id(case: tuple) -> str:
    return "-".join(str(c) for c in case)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fsdp")
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_worker, args=(free_port(), CASES, str(folder), result), nprocs=2, join=True)
        return dict(result)


def _result(results: dict, case: tuple) -> dict:
    errors = [v["error"] for k, v in results.items() if k.startswith(_case_id(case)) and "error" in v]
    assert not errors, errors
    return results[_case_id(case)]


def _check(r: dict) -> None:
    print(f"\n[fsdp] loss {r['loss'][0]:.7f} vs {r['loss'][1]:.7f}, max rel grad err {r['grad']:.2e}, sample err {r['sample']:.2e}, worst {r['worst']}")
    loss, ref = r["loss"]
    assert abs(loss - ref) <= TOL * max(1.0, abs(ref)), r["loss"]
    assert r["names"][0] == r["names"][1], "every trainable parameter has a gradient under FSDP"
    assert r["grad"] < 1e-4, r["grad"]  # relative to each tensor's largest gradient
    assert r["nonzero"] > 0, f"tensors without gradient: {r['zero']}"
    assert r["sample"] < 1e-4, r["sample"]


@pytest.mark.parametrize("lora", [pytest.param(False, marks=pytest.mark.slow), True], ids=["full", "lora"])
def test_fsdp1_one_unit_per_block_matches_unwrapped(lora, fsdp_results):
    _check(_result(fsdp_results, ("fsdp1", lora, "none")))


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["model", "policy"])
def test_fsdp1_activation_checkpointing_per_block(checkpointing, fsdp_results):
    _check(_result(fsdp_results, ("fsdp1", True, checkpointing)))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp2_fully_shard_per_block_matches_unwrapped(lora, fsdp_results):
    _check(_result(fsdp_results, ("fsdp2", lora, "none")))


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints: written as Lightning's FSDPStrategy(state_dict_type="sharded") writes them,
# resumed as it resumes them, and read by DiTFuseModule.from_checkpoint (`ditfuse fuse --checkpoint`)
# ---------------------------------------------------------------------------------------------
def _sharded(rank: int, lora: bool, folder: str) -> dict:
    import lightning
    from lightning.fabric.strategies.fsdp import (_distributed_checkpoint_load, _distributed_checkpoint_save,
                                                  _get_sharded_state_dict_context)
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    wrap = functools.partial(FSDP, auto_wrap_policy=ModuleWrapPolicy({OmniGenBlock}), use_orig_params=True,
                             device_id=torch.device("cpu"))
    model = _model(lora)
    root = wrap(model)  # Lightning wraps the LightningModule itself
    opt = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=0.1)
    # Lightning calls training_step through the root unit's forward (its _ForwardRedirection)
    loss = _ForwardRedirection()(root, model, "flow_loss", _batch(), dropout=False, seeds=[1, 2, 3])
    loss.mean().backward()  # then a step moves the weights
    opt.step()
    # save (FSDPStrategy.save_checkpoint, sharded): the hook sees a sharded state dict
    with _get_sharded_state_dict_context(root):
        checkpoint = {"state_dict": root.state_dict(), "hyper_parameters": dict(model.hparams),
                      "pytorch-lightning_version": lightning.__version__}
    model.on_save_checkpoint(checkpoint)
    _distributed_checkpoint_save({"model": checkpoint.pop("state_dict")}, Path(folder))
    if rank == 0:
        torch.save(checkpoint, Path(folder) / "meta.pt")
    dist.barrier()
    # resume (FSDPStrategy.load_checkpoint, sharded): the whole module's keys are loaded
    fresh = _model(lora)
    root2 = wrap(fresh)
    with _get_sharded_state_dict_context(root2):
        state = {"model": root2.state_dict()}
        _distributed_checkpoint_load(state, Path(folder))
        root2.load_state_dict(state["model"], strict=fresh.strict_loading)
    fresh.on_load_checkpoint(torch.load(Path(folder) / "meta.pt", weights_only=False))
    with FSDP.summon_full_params(root), FSDP.summon_full_params(root2):
        trained = {_clean(n): p.detach().clone() for n, p in root.named_parameters()}
        resumed = {_clean(n): p.detach().clone() for n, p in root2.named_parameters()}
    dist.barrier()
    if rank != 0:
        return {}
    # `ditfuse fuse --checkpoint FOLDER` loads through from_checkpoint
    loaded = dict(DiTFuseModule.from_checkpoint(folder).named_parameters())
    init = dict(_model(lora).named_parameters())
    return {"resumed": max((trained[n] - resumed[n]).abs().max().item() for n in trained),
            "loaded": max((trained[n] - loaded[n].detach()).abs().max().item() for n in trained),
            "moved": sum((trained[n] - init[n].detach()).abs().sum().item() for n in trained if init[n].requires_grad)}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sharded_checkpoint_resumes_and_loads_for_fuse(lora, fsdp_results):
    r = _result(fsdp_results, ("sharded", lora))
    assert r["moved"] > 0, "the optimizer step changed the trained weights"
    assert r["resumed"] == 0.0 and r["loaded"] == 0.0, r
