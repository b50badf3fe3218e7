"""No-reference IQA (CLIPIQA, MANIQA) through pyiqa, built strictly offline from local files.

pyiqa downloads its weights on first use, and offline that fails slowly (docs/METRICS.md):
CLIP's urllib download has no timeout, timm's hub download retries for about 48 s. So this module
1. resolves every file a metric needs, from explicit paths or a folder laid out like pyiqa's own
   cache (the torch hub dir: `clip/RN50.pt`, `pyiqa/ckpt_koniq10k.pt`, ...); a missing file is a
   one-line `IQAWeightsMissing` naming the file, the metric, where to get it and where to put it;
2. builds each metric from those paths with `pretrained=False`, inside `_no_downloads()`, which
   makes every download function pyiqa, timm, CLIP or huggingface_hub could reach raise at once.

`TORCH_HOME` is never set here: pyiqa freezes its cache dir at import, but nothing below reads that
cache; the default `weights_dir` is `torch.hub.get_dir()` evaluated at call time, so it follows
`TORCH_HOME` whether or not pyiqa was imported before.

Cost per 512x512 image on the 2-core reference CPU (real-size networks): clipiqa 1-4.5 s;
maniqa 2-3 s per 224x224 crop, 20 crops by default (~60 s). So on CPU pass `maniqa_crops` and cap
the images scored per epoch (the callbacks do); on a GPU both are cheap. Building both: ~4-10 s.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

_PYIQA_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/{}"
# OpenAI's RN50, as listed in clip.clip._MODELS (and pyiqa.archs.clip_model._MODELS).
_CLIP_RN50_URL = ("https://openaipublic.azureedge.net/clip/models/"
                  "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt")

# metric -> role -> file, relative to the torch hub dir (where pyiqa itself would cache it).
# The first role is the metric's main file: `files={"maniqa": PATH}` means that one.
METRIC_FILES: dict[str, dict[str, str]] = {
    "clipiqa": {"backbone": "clip/RN50.pt"},
    "clipiqa+": {"backbone": "clip/RN50.pt",
                 "prompts": "pyiqa/CLIP-IQA+_learned_prompts-603f3273.pth"},
    "maniqa": {"checkpoint": "pyiqa/ckpt_koniq10k.pt"},
    "maniqa-kadid": {"checkpoint": "pyiqa/ckpt_kadid10k.pt"},
    "maniqa-pipal": {"checkpoint": "pyiqa/MANIQA_PIPAL-ae6d356b.pth"},
}


class IQAWeightsMissing(FileNotFoundError):
    """A file an IQA metric needs is not on disk (the message is one line)."""


class IQADownloadBlocked(RuntimeError):
    """Something tried to download while an IQA metric was being built offline."""


# ---------------------------------------------------------------------------------------------
# 1. Resolve files
# ---------------------------------------------------------------------------------------------
def _source_url(relpath: str) -> str:
    if relpath.startswith("clip/"):
        return _CLIP_RN50_URL
    return _PYIQA_URL.format(relpath.split("/", 1)[1])


def _files_key(metric: str, role: str) -> str:
    return metric if role == next(iter(METRIC_FILES[metric])) else f"{metric}.{role}"


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in METRIC_FILES]
    if unknown:
        raise ValueError(f"unknown IQA metric(s) {unknown}; supported: {sorted(METRIC_FILES)}")
    return names


def _explicit_files(files: Mapping[str, str | Path] | None,
                    names: tuple[str, ...]) -> dict[tuple[str, str], Path]:
    """`{"maniqa": p}` or `{"clipiqa+.prompts": p}` -> {(metric, role): Path}."""
    out: dict[tuple[str, str], Path] = {}
    for key, path in (files or {}).items():
        metric, _, role = key.partition(".")
        roles = METRIC_FILES.get(metric, {})
        role = role or next(iter(roles), "")
        if role not in roles:
            accepted = [m for m in METRIC_FILES] + [f"{m}.{r}" for m, rs in METRIC_FILES.items()
                                                    for r in rs]
            raise ValueError(f"files key {key!r} is not one of {accepted}")
        if metric in names:
            out[(metric, role)] = Path(path).expanduser()
    return out


def resolve_iqa_weights(weights_dir: str | Path | None = None,
                        files: Mapping[str, str | Path] | None = None,
                        names: Sequence[str] = ("clipiqa", "maniqa"),
                        ) -> dict[str, dict[str, Path]]:
    """Find every file each metric in `names` needs: {metric: {role: path}}.

    `files` maps a metric (its main file) or `"<metric>.<role>"` to a path and wins over
    `weights_dir`, a folder laid out like the torch hub dir (default: `torch.hub.get_dir()`,
    i.e. `$TORCH_HOME/hub`; a `TORCH_HOME`-style folder holding `hub/` works too).
    Raises `IQAWeightsMissing` (one line) for the first file not found.
    """
    names = _check_names(names)
    explicit = _explicit_files(files, names)
    root = Path(weights_dir).expanduser() if weights_dir is not None else Path(torch.hub.get_dir())
    resolved: dict[str, dict[str, Path]] = {}
    for metric in names:
        resolved[metric] = {}
        for role, relpath in METRIC_FILES[metric].items():
            if (metric, role) in explicit:
                path = explicit[(metric, role)]
                if not path.is_file():
                    raise IQAWeightsMissing(
                        f"{metric}: {role} file {path} (given in files) does not exist; it is "
                        f"{Path(relpath).name} from {_source_url(relpath)}")
            else:
                path = next((p for p in (root / relpath, root / "hub" / relpath) if p.is_file()),
                            None)
                if path is None:
                    raise IQAWeightsMissing(
                        f"{metric}: missing {relpath} under {root}; download "
                        f"{_source_url(relpath)} to {root / relpath}, or pass "
                        f"files={{'{_files_key(metric, role)}': PATH}}")
            resolved[metric][role] = path
    return resolved


# ---------------------------------------------------------------------------------------------
# 2. Offline guard
# ---------------------------------------------------------------------------------------------
# Every download entry point the clipiqa/maniqa build could reach, where each module looks it up
# (several modules import these functions by name, so each binding is patched).
_DOWNLOAD_FUNCTIONS: tuple[tuple[str, str], ...] = (
    ("torch.hub", "download_url_to_file"),
    ("torch.hub", "load_state_dict_from_url"),
    ("pyiqa.utils.download_util", "download_url_to_file"),
    ("pyiqa.utils.download_util", "load_file_from_url"),
    ("pyiqa.utils.download_util", "download_file_from_google_drive"),
    ("pyiqa.archs.arch_util", "load_file_from_url"),
    ("pyiqa.archs.clipiqa_arch", "load_file_from_url"),
    ("pyiqa.archs.clip_model", "_download"),
    ("clip.clip", "_download"),
    ("timm.models._builder", "load_pretrained"),
    ("timm.models._builder", "download_cached_file"),
    ("timm.models._builder", "load_state_dict_from_hf"),
    ("timm.models._builder", "load_state_dict_from_url"),
    ("timm.models._hub", "download_cached_file"),
    ("timm.models._hub", "download_url_to_file"),
    ("timm.models._hub", "hf_hub_download"),
    ("huggingface_hub", "hf_hub_download"),
    ("huggingface_hub", "snapshot_download"),
    ("huggingface_hub.file_download", "hf_hub_download"),
    ("urllib.request", "urlopen"),
    ("requests.sessions", "Session.request"),
)


def _blocked(qualname: str) -> Callable:
    def refuse(*args, **kwargs):
        raise IQADownloadBlocked(f"{qualname} tried to download while building an IQA metric "
                                 "offline; place the file locally (see ditfuse.eval.iqa)")
    return refuse


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Make every known download function raise `IQADownloadBlocked` for the duration.

    Process-wide while it lasts (a build takes seconds): another thread downloading at that
    moment would be refused too.
    """
    saved = []
    try:
        for module_name, attr in _DOWNLOAD_FUNCTIONS:
            try:
                owner = importlib.import_module(module_name)
            except ImportError:
                continue
            *parents, leaf = attr.split(".")
            for part in parents:
                owner = getattr(owner, part)
            if hasattr(owner, leaf):
                saved.append((owner, leaf, getattr(owner, leaf)))
                setattr(owner, leaf, _blocked(f"{module_name}.{attr}"))
        yield
    finally:
        for owner, leaf, original in reversed(saved):
            setattr(owner, leaf, original)


# ---------------------------------------------------------------------------------------------
# 3. Build metrics
# ---------------------------------------------------------------------------------------------
def _import_pyiqa():
    try:
        return importlib.import_module("pyiqa")
    except Exception as exc:  # ImportError, or pkg_resources missing inside openai-clip
        raise ImportError(
            "CLIPIQA/MANIQA need pyiqa: pip install 'ditfuse[iqa]' (pyiqa, and setuptools<82 "
            f"since openai-clip imports pkg_resources); import failed with {exc!r}") from exc


@contextlib.contextmanager
def _maniqa_vit(vit_kwargs: dict) -> Iterator[None]:
    """Neutralise the one `timm.create_model('vit_base_patch8_224', pretrained=True)` in pyiqa.

    Swaps the `timm` name inside `pyiqa.archs.maniqa_arch` only (timm itself is untouched) for a
    proxy whose `create_model` forces `pretrained=False`: the MANIQA checkpoint holds every
    `vit.*` weight, so timm's ImageNet download is never needed. `vit_kwargs` size the ViT to the
    checkpoint (empty for the real one).
    """
    import timm
    from pyiqa.archs import maniqa_arch

    class _OfflineTimm:
        def __getattr__(self, name):
            return getattr(timm, name)

        @staticmethod
        def create_model(model_name, pretrained=False, **kwargs):
            return timm.create_model(model_name, pretrained=False, **{**kwargs, **vit_kwargs})

    saved = maniqa_arch.timm
    maniqa_arch.timm = _OfflineTimm()
    try:
        yield
    finally:
        maniqa_arch.timm = saved


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # pickled extras; pyiqa itself loads with weights_only=False
        state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, Mapping) and "params" in state:
        state = state["params"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    """Number of distinct indices i in keys `prefix.i.*`."""
    return len({k[len(prefix) + 1:].split(".")[0] for k in state if k.startswith(prefix + ".")})


def _maniqa_sizes(state: Mapping[str, Tensor]) -> tuple[dict, dict]:
    """(MANIQA kwargs, ViT kwargs) read off a MANIQA state dict.

    For the released checkpoints this gives pyiqa's defaults (ViT-B/8: 768 wide, 12 deep; MANIQA:
    dim_mlp 768, depths [2, 2], heads [4, 4], window 4, 2 TA blocks). ViT heads are not visible
    in the shapes; ViT-B's head width 64 is assumed (768 -> 12).
    """
    vit_dim = state["vit.cls_token"].shape[-1]
    vit = dict(embed_dim=vit_dim, depth=_count(state, "vit.blocks"),
               num_heads=max(1, vit_dim // 64),
               mlp_ratio=state["vit.blocks.0.mlp.fc1.weight"].shape[0] / vit_dim,
               num_classes=state["vit.head.weight"].shape[0] if "vit.head.weight" in state else 0)
    swin = "swintransformer1.layers"
    n_layers = _count(state, swin)
    bias_table = [state[f"{swin}.{i}.blocks.0.attn.relative_position_bias_table"]
                  for i in range(n_layers)]
    maniqa = dict(embed_dim=state["conv1.weight"].shape[0],
                  dim_mlp=state[f"{swin}.0.blocks.0.mlp.fc1.weight"].shape[0],
                  depths=[_count(state, f"{swin}.{i}.blocks") for i in range(n_layers)],
                  num_heads=[t.shape[1] for t in bias_table],
                  window_size=(round(bias_table[0].shape[0] ** 0.5) + 1) // 2,
                  num_tab=_count(state, "tablock1"))
    if vit["depth"] < 10:
        raise ValueError(f"MANIQA checkpoint has a {vit['depth']}-block ViT; MANIQA reads "
                         "blocks 6-9, so it needs at least 10")
    return maniqa, vit


class IQAScorer:
    """Callable `(N, 3, H, W)` float in [0, 1] -> scores `[N]`, on the input's device.

    Inputs are clamped to [0, 1] (pyiqa asserts the range; sampler outputs overshoot slightly).
    `metric` is the pyiqa `InferenceModel`.
    """

    def __init__(self, name: str, metric: torch.nn.Module, device: str | torch.device):
        self.name, self.metric, self.device = name, metric, torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (N, 3, H, W), got {tuple(images.shape)}")
        self.metric.eval()  # a parent module's .train() must not switch MANIQA to random crops
        x = images.detach().to(self.device, torch.float32).clamp(0.0, 1.0)
        return self.metric(x).reshape(-1).to(images.device)

    def __repr__(self) -> str:
        return f"IQAScorer({self.name!r}, device={self.device})"


def _check_torchscript(name: str, path: Path) -> None:
    """pyiqa's clip_model.load() only reads TorchScript: its state-dict fallback re-reads an
    already consumed file handle and dies with an EOFError, so say what is wrong up front."""
    try:
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith("constants.pkl") for n in archive.namelist()):
                return
    except zipfile.BadZipFile:
        pass
    raise ValueError(f"{name}: backbone {path} is not a TorchScript archive (OpenAI's RN50.pt is; "
                     "pyiqa cannot load a plain state dict); re-download it from "
                     f"{_CLIP_RN50_URL}")


def _build_one(pyiqa, name: str, paths: dict[str, Path], device: str | torch.device,
               maniqa_crops: int | None) -> IQAScorer:
    if name.startswith("clipiqa"):
        # `backbone` is a file, so clip_model.load() reads it instead of downloading RN50.
        _check_torchscript(name, paths["backbone"])
        metric = pyiqa.create_metric(name, backbone=str(paths["backbone"]), pretrained=False,
                                     device="cpu")
        if "prompts" in paths:  # what CLIPIQA(pretrained=True) would load for clipiqa+
            ctx = torch.load(paths["prompts"], map_location="cpu", weights_only=True)
            metric.net.prompt_learner.ctx.data = ctx.to(metric.net.prompt_learner.ctx)
    else:
        state = _load_state_dict(paths["checkpoint"])
        maniqa_kwargs, vit_kwargs = _maniqa_sizes(state)
        with _maniqa_vit(vit_kwargs):
            metric = pyiqa.create_metric(name, pretrained=False, device="cpu", **maniqa_kwargs)
        # == metric.load_weights(path, weight_keys=None), without reading the file twice
        metric.net.load_state_dict(state, strict=True)
        if maniqa_crops is not None:
            metric.net.test_sample = maniqa_crops
    return IQAScorer(name, metric.to(device).eval(), device)


def build_iqa_metrics(weights_dir: str | Path | None = None,
                      files: Mapping[str, str | Path] | None = None,
                      names: Sequence[str] = ("clipiqa", "maniqa"),
                      required: bool = True,
                      device: str | torch.device = "cpu",
                      maniqa_crops: int | None = None,
                      ) -> dict[str, Callable[[Tensor], Tensor]]:
    """Build {name: scorer} for `names` from local files only; never touches the network.

    Files are found as in `resolve_iqa_weights`. With `required=False` a metric whose file is
    missing (or all of them, when pyiqa does not import) is dropped with one warning line.
    `maniqa_crops` overrides MANIQA's 20 224x224 crops per image (cost is linear in it). pyiqa
    lays them on a grid from the top-left corner, so 1 crop sees only that corner; 4 see all
    four corners. Scores move with the crop count, so compare runs only at one setting.
    """
    names = _check_names(names)
    if maniqa_crops is not None and maniqa_crops < 1:
        raise ValueError(f"maniqa_crops must be >= 1, got {maniqa_crops}")
    found: dict[str, dict[str, Path]] = {}
    for name in names:  # every file first: a missing one fails before pyiqa's slow import
        try:
            found.update(resolve_iqa_weights(weights_dir, files, (name,)))
        except IQAWeightsMissing as exc:
            if required:
                raise
            warnings.warn(f"IQA metric {name} dropped: {exc}", stacklevel=2)
    if not found:
        return {}
    try:
        pyiqa = _import_pyiqa()
    except ImportError as exc:
        if required:
            raise
        warnings.warn(f"IQA metrics {list(found)} dropped: {exc}", stacklevel=2)
        return {}
    scorers: dict[str, Callable[[Tensor], Tensor]] = {}
    for name, paths in found.items():
        with _no_downloads(), warnings.catch_warnings():
            # clip_model.load() reads the TorchScript RN50 with the deprecated torch.jit.load
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated",
                                    category=FutureWarning)
            scorers[name] = _build_one(pyiqa, name, paths, device, maniqa_crops)
    return scorers
