"""Tokenizers: a built-in, file-free word-level one for `tiny`, and the checkpoint's own.

Why not bytes: a byte-level tokenizer makes a DiTFuse prompt ~400 tokens, several times the
2x64 image tokens of the 32x32 demo, and attention cost grows with it. Here each fixed phrase of
the OmniGen wrapper and the DiTFuse template, each pooled instruction (ditfuse.core.prompts), each tag
and special marker is one token, other prompt words are one token each, and anything else falls
back to its UTF-8 bytes: a wrapped DiTFuse prompt is ~20 tokens and every string still maps to
ids without files.

Both tokenizers expose the same small interface used by `ditfuse.model.conditioning`:
`encode(text) -> list[int]` (with a leading BOS, like the Llama/Phi-3 tokenizer OmniGen uses),
`bos_token_id`, `pad_token_id`, `vocab_size`, and `__call__(text).input_ids` (the HF calling
convention diffusers' OmniGenMultiModalProcessor relies on).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from ditfuse.core import prompts as P

# Ids 0..2 follow the Llama convention OmniGen inherits: <unk>=0, <s>=1 (BOS), </s>=2 (OmniGen's
# collator pads with 2).
SPECIALS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<|user|>", "<|end|>", "<|assistant|>",
                             "<|diffusion|>", "<img>", "</img>", "<cfg>")
TAGS: tuple[str, ...] = tuple(sorted(set(P.TASK_TAG.values()) | set(P.FUSION_SUBTAG.values())
                                     | {f"<{s}>" for s in P.CONTROL_SUBTASKS}))
# A few class names likely in segmentation prompts (others fall back to bytes).
_EXTRA_WORDS = ("person people car tree sky road building grass water bicycle bus truck dog cat "
                "bird boat house window door wall flower plant chair table sign light mountain "
                "cloud sea sand rock field fence pole street sidewalk vehicle animal object "
                "generate image according following instructions").split()



def _phrases() -> tuple[str, ...]:
    """Fixed multi-word phrases: OmniGen's wrapper and default negative prompt, the DiTFuse template
    around the image placeholders, and every pooled instruction (seg ones split around their class
    name)."""
    out = {"Generate an image according to the following instructions", P.NEGATIVE_PROMPT}
    out.update(part.strip(" ") for part in re.split(r"\{head\}|<img><\|image_\d\|></img>|\{instruction\}", P.TEMPLATE))
    for pool in list(P.INSTRUCTIONS.values()) + list(P.CONTROL_INSTRUCTIONS.values()):
        for text in pool:
            out.update(part.strip(" ") for part in text.split("{cls}"))
    # longest first (the regex tries them in order); ties by text: a set's order depends on the
    # process's hash seed, and every DDP rank and every later process must get the same ids
    return tuple(sorted((p for p in out if len(p.split()) > 1), key=lambda p: (-len(p), p)))


PHRASES = _phrases()


def _pattern(text: str) -> str:  # a phrase matches with any run of whitespace between its words
    return r"\s+".join(re.escape(w) for w in text.split())


_SPECIAL_RE = "|".join(re.escape(s) for s in sorted(SPECIALS + TAGS, key=len, reverse=True))
_PHRASE_RE = "|".join(f"(?:{_pattern(p)})" for p in PHRASES)
_TOKEN_RE = re.compile(rf"{_SPECIAL_RE}|{_PHRASE_RE}|[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]")


def _prompt_words() -> list[str]:
    texts = [P.TEMPLATE, P.NEGATIVE_PROMPT] + [s for pool in P.INSTRUCTIONS.values() for s in pool]
    texts += [s for pool in P.CONTROL_INSTRUCTIONS.values() for s in pool]
    words = set(_EXTRA_WORDS)
    for t in texts:
        words.update(w.lower() for w in re.findall(r"[A-Za-z]+", t))
    return sorted(words)


class BuiltinTokenizer:
    """Phrase/word-level tokenizer over the DiTFuse prompt vocabulary with UTF-8 byte fallback.

    Matching order: specials and tags, fixed phrases, words (lower-cased), digits/punctuation,
    bytes for the rest. Whitespace separates tokens and is not encoded (decode joins with
    spaces). Ids: specials, tags, 256 byte tokens, punctuation/digits, phrases, words.
    """

    def __init__(self) -> None:
        self._bytes = [f"<0x{b:02X}>" for b in range(256)]
        punct = [c for c in "0123456789.,:;!?'\"()[]{}<>-_/\\|+*=&%$#@^~`"]
        vocab = list(SPECIALS) + list(TAGS) + self._bytes + punct + list(PHRASES) + _prompt_words()
        seen: dict[str, int] = {}
        for tok in vocab:
            seen.setdefault(tok, len(seen))
        self.token_to_id = seen
        self.id_to_token = list(seen)
        self._byte0 = seen["<0x00>"]

    unk_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 2

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_bos else []
        for piece in _TOKEN_RE.findall(text):
            if " " in piece or "\n" in piece or "\t" in piece:  # a phrase, whatever its inner whitespace
                piece = " ".join(piece.split())
            key = piece if piece in self.token_to_id and not piece.isalpha() else piece.lower()
            tid = self.token_to_id.get(key)
            if tid is None:  # byte fallback
                ids.extend(self._byte0 + b for b in piece.encode("utf-8"))
            else:
                ids.append(tid)
        return ids

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if self._byte0 <= i < self._byte0 + 256:
                buf.append(i - self._byte0)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            if i not in (self.bos_token_id, self.pad_token_id):
                out.append(self.id_to_token[i])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return " ".join(out)

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.encode(text))


class PretrainedTokenizer:
    """The checkpoint's own tokenizer (Phi-3/Llama for OmniGen-v1), from a local folder only."""

    # OmniGen's collator pads input ids with 2 (</s>); pad positions are masked anyway.
    pad_token_id = 2

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        for cand in (path / "tokenizer", path):
            if (cand / "tokenizer_config.json").is_file() or (cand / "tokenizer.json").is_file():
                break
        else:
            raise FileNotFoundError(
                f"no tokenizer in {path} (looked for tokenizer/ and tokenizer.json/tokenizer_config.json): "
                "pass a local OmniGen folder via --model.pretrained or --model.tokenizer; nothing is downloaded")
        self.hf = _load_hf_tokenizer(cand)
        self.bos_token_id = self.hf.bos_token_id
        self.vocab_size = len(self.hf)
        # Llama/Phi-3 tokenizer_config.json says add_bos_token; transformers 4.x rebuilt the
        # post-processor from it, so honour it where the file's post-processor does not add BOS
        cfg_file = cand / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        self.force_bos = bool(cfg.get("add_bos_token")) and self.bos_token_id is not None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self.hf(text).input_ids)
        if self.force_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        if not add_bos and ids and ids[0] == self.bos_token_id:
            ids = ids[1:]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.encode(text))


def _load_hf_tokenizer(folder: Path):
    """The folder's tokenizer, tokenizing exactly as the original OmniGen (transformers 4.45) does.

    With a tokenizer.json it is used verbatim (PreTrainedTokenizerFast): transformers 5's
    LlamaTokenizer rebuilds its own normalizer from the vocabulary and drops the "▁" that the
    file's normalizer puts after special tokens (`<|user|>` + "\n" gives other ids than in 4.45).
    Without one, AutoTokenizer with an empty config: otherwise it parses the folder's model
    config.json, in the original OmniGen-v1 layout a Phi-3 config with rope_scaling type "su",
    which transformers 5 rejects (KeyError: 'original_max_position_embeddings').
    """
    from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, config=PretrainedConfig())


Tokenizer = BuiltinTokenizer | PretrainedTokenizer


def load_tokenizer(spec: str | Path | None) -> Tokenizer:
    """`"builtin"` (or None) -> BuiltinTokenizer; a local folder -> PretrainedTokenizer."""
    if spec is None or str(spec) == "builtin":
        return BuiltinTokenizer()
    if not Path(spec).exists():
        raise FileNotFoundError(f"tokenizer path {spec} does not exist (use 'builtin' or a local folder)")
    return PretrainedTokenizer(spec)
