"""Shard schema (docs/SHARDS.md): kinds, file names per sample, tar reading, checks.

A shard is a WebDataset tar `{kind}-%06d.tar`; a sample is the consecutive members that share a
key (the member path up to the first dot of its file name); the rest of the name is the field
(`img1.png`, `json`, ...). Shards are read through the webdataset library, so a shard may be a
local path or anything its opener takes (`pipe:CMD`, `http(s)://...`, ...).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from ditfuse.core.prompts import CONTROL_SUBTASKS, FUSION_TASKS

KINDS: tuple[str, ...] = ("fusion", "m3", "seg", "control")
IMAGE_FIELD_EXTS = ("png", "jpg", "jpeg")
# seg class names that are never asked for ("Segment the background" is not a task)
NOT_A_CLASS = frozenset({"background", "unlabeled", "unlabelled", "void", "ignore"})
# mff/mef pairs without a target, only when chosen (data.target_fallback, `ditfuse shards write
# --target-fallback`); here so the writers and the pipelines read one list
FUSION_FALLBACKS = ("mean", "image1", "image2")

Sample = dict[str, bytes]  # field ("img1.png", "json", ...) -> bytes; plus "__key__"/"__shard__" as str


class SchemaError(ValueError):
    """A sample that does not follow SHARDS.md."""


class ShardReadError(OSError):
    """A tar that is truncated, garbage or unreadable."""


def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:06d}.tar"


def split_name(name: str) -> tuple[str, str]:
    """'dir/abc.img1.png' -> ('dir/abc', 'img1.png')."""
    d, base = os.path.split(name)
    stem, _, field = base.partition(".")
    return (f"{d}/{stem}" if d else stem), field


def is_url(spec: str) -> bool:
    """True for what webdataset's opener handles itself (`pipe:`, `http(s)://`, `s3://`, ...)."""
    return bool(_URL_RE.match(spec))


_URL_RE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]+://)")


# a stalled http(s) server (open connection, no bytes) is abandoned after this many seconds
DEFAULT_STALL_TIMEOUT = 60.0


def open_http(url: str, stall_timeout: float):
    """curl, as webdataset's gopen runs it for http(s), plus `--speed-limit 1 --speed-time T`:
    a transfer that delivers nothing for T seconds ends with curl's status 28, an OSError when
    the stream closes. Without `--retry` (webdataset's default retries 30 times): curl cannot
    rewind stdout, so a retried transfer would be appended to the bytes already read; a failed
    shard is counted as broken instead (data.max_bad_fraction) and training goes on."""
    from webdataset.gopen import Pipe

    cmd = ["curl", "--connect-timeout", "30", "-f", "-s", "-L", "--speed-limit", "1",
           "--speed-time", str(max(1, round(stall_timeout))), url]
    return Pipe(cmd, mode="rb", bufsize=8192, ignore_status=[141, 23])


def read_shard(url: str, stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> Iterator[dict]:
    """Samples of one shard in order, read with webdataset's stages: `gopen` (local path, `pipe:`,
    http(s), the other schemes it knows) -> `tar_file_expander` -> `group_by_keys`. An http(s)
    stream that sends nothing for `stall_timeout` seconds fails like a truncated shard.

    Each sample is {"__key__", "__shard__", field: bytes, ...}. Raises ShardReadError (after
    yielding every complete sample before the damage) when the tar is truncated, garbage, or its
    stream fails; the sample cut at the damage is dropped (group_by_keys still holds it).
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = None
    try:
        http = url.startswith(("http://", "https://"))
        stream = open_http(url, stall_timeout) if http else gopen(url, "rb")
        files = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
        for sample in group_by_keys(files):
            sample["__shard__"] = sample.pop("__url__", url)
            yield sample
        _close(stream)  # a pipe's exit status is only known here
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ShardReadError(f"{url}: unreadable shard ({type(e).__name__}: {_first_line(e)})") from e
    finally:
        if stream is not None:
            try:
                _close(stream)
            except (OSError, ValueError):
                pass  # already reported above


def _close(stream) -> None:
    if not getattr(stream, "closed", False) and not getattr(getattr(stream, "stream", None), "closed", False):
        stream.close()


def _first_line(e: BaseException) -> str:
    return str(e.args[0] if e.args else e).splitlines()[0][:300]


def iter_tar(path: str | Path) -> Iterator[dict]:
    """`read_shard` under its old name (notebooks and scripts use it)."""
    return read_shard(str(path))


def image_field(sample: dict, stem: str) -> str | None:
    """The field name of image `stem` ('img1' -> 'img1.png' / 'img1.jpg'), or None."""
    for ext in IMAGE_FIELD_EXTS:
        if f"{stem}.{ext}" in sample:
            return f"{stem}.{ext}"
    return None


def sample_json(sample: dict) -> dict:
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"sample {sample.get('__key__')}: json is not valid UTF-8 JSON ({e})") from e
    if not isinstance(meta, dict):
        raise SchemaError(f"sample {sample.get('__key__')}: json must be an object")
    return meta


def _need(sample: dict, stems: tuple[str, ...], kind: str) -> None:
    missing = [s for s in stems if image_field(sample, s) is None]
    if missing:
        raise SchemaError(f"{kind} sample {sample.get('__key__')}: missing {', '.join(missing)} "
                          f"(.png/.jpg); has {sorted(k for k in sample if not k.startswith('__'))}")


def check_sample(kind: str, sample: dict) -> dict:
    """Validate one sample against SHARDS.md; returns its parsed json."""
    if kind not in KINDS:
        raise SchemaError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    meta = sample_json(sample)
    key = sample.get("__key__")
    if kind == "fusion":
        _need(sample, ("img1", "img2"), kind)
        if meta.get("task") not in FUSION_TASKS:
            raise SchemaError(f"fusion sample {key}: json task must be one of {FUSION_TASKS}, got {meta.get('task')!r}")
    elif kind == "seg":
        _need(sample, ("img1", "img2", "mask"), kind)
        classes = meta.get("classes")
        if not isinstance(classes, dict) or not classes:
            raise SchemaError(f"seg sample {key}: json needs a non-empty 'classes' {{label id: name}}")
    elif kind == "m3" or (kind == "control" and image_field(sample, "img")):
        if image_field(sample, "img") is None:
            _need(sample, ("img1", "img2", "target"), kind)
    else:  # control triple
        _need(sample, ("img1", "img2", "target"), kind)
    sub = meta.get("subtask")
    if kind == "control" and sub is not None and sub not in CONTROL_SUBTASKS:
        raise SchemaError(f"control sample {key}: subtask must be one of {CONTROL_SUBTASKS}, got {sub!r}")
    return meta


def expand_shards(spec: str | list[str] | tuple[str, ...], setting: str = "shards") -> list[str]:
    """Shard specs -> sorted shard URLs. Local: paths, folders (their *.tar), globs, brace patterns
    (`data/m3-{000000..000009}.tar`); remote: `pipe:` commands and URLs, brace-expanded (webdataset's
    `expand_urls`, so `::` joins lists too) and checked only when read."""
    from webdataset.shardlists import expand_urls

    patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for pattern in patterns:
        for p in expand_urls(str(pattern)):
            if is_url(p):
                paths.append(p)
                continue
            p = os.path.expanduser(p)
            if os.path.isdir(p):
                paths += sorted(glob.glob(os.path.join(p, "*.tar")))
            elif glob.has_magic(p):
                paths += sorted(glob.glob(p))
            elif os.path.exists(p):
                paths.append(p)
            else:
                raise FileNotFoundError(f"{setting}: {p} does not exist")
    if not paths:
        raise FileNotFoundError(f"{setting}: {spec!r} matched no tar files")
    return sorted(dict.fromkeys(paths))
