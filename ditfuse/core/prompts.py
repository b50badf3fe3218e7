"""Task tags, the DiTFuse prompt template and per-task instruction pools.

Shared by the data pipelines (training prompts) and inference (`ditfuse fuse`), so a model is
always asked in the words it was trained on. Source: DiTFuse (arXiv 2512.07170) and its released
prompts; see docs/PROMPTS.md.
"""

from __future__ import annotations

import random
from typing import Literal

# ---------------------------------------------------------------------------------------------
# Tags
# ---------------------------------------------------------------------------------------------
Task = Literal["ivif", "mff", "mef", "m3", "seg", "control"]
TASKS: tuple[str, ...] = ("ivif", "mff", "mef", "m3", "seg", "control")
FUSION_TASKS: tuple[str, ...] = ("ivif", "mff", "mef")

TASK_TAG = {"ivif": "[FUSION]", "mff": "[FUSION]", "mef": "[FUSION]", "m3": "[FUSION]",
            "control": "[CONTROL]", "seg": "[SEG]"}

# Fusion subtask tags; M3 and SEG have none (docs/PROMPTS.md).
FUSION_SUBTAG = {"ivif": "<MULTI-MODALITIES>", "mff": "<MULTI-FOCUS>", "mef": "<MULTI-EXPOSURE>"}

CONTROL_SUBTASKS: tuple[str, ...] = ("LIGHT++", "LIGHT+", "LIGHT-", "LIGHT--", "CONTRAST+", "CONTRAST-")

# The two image placeholders, exactly as OmniGen expects them (`<|image_k|>` inside <img></img>).
IMAGE_1 = "<img><|image_1|></img>"
IMAGE_2 = "<img><|image_2|></img>"

IMAGES = "This is the first image " + IMAGE_1 + ", and this is the second image " + IMAGE_2 + "."
REQUIREMENTS = "Please generate the image based on the following requirements:"
# `{head}I R XXX` (PROMPTS.md). The published IVIF example has no R ("... second image
# <img><|image_2|></img>. Please generate a fused image that ..."), so IVIF prompts leave it out.
TEMPLATE = "{head}" + IMAGES + " " + REQUIREMENTS + " {instruction}"
TEMPLATE_NO_REQUIREMENTS = "{head}" + IMAGES + " {instruction}"
NO_REQUIREMENTS_TASKS: tuple[str, ...] = ("ivif",)

# OmniGen's default negative prompt: the unconditional guidance branch's text, without images
# (OmniGenProcessor.__call__, argument `negative_prompt`; PROMPTS.md). Official training instead
# drops all conditions to the instruction `<cfg>` without images (OmniGen/train_helper/data.py).
NEGATIVE_PROMPT = (
    "low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, mutated hands, "
    "poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad anatomy, bad "
    "proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs, missing arms, "
    "missing legs, extra arms, extra legs, fused fingers, too many fingers."
)
DROP_ALL_PROMPT = "<cfg>"

# ---------------------------------------------------------------------------------------------
# Instruction pools (several phrasings each; the first is the published one, verbatim:
# DiTFuse prompt.md section 5, copied in PROMPTS.md; CONTROL's only published text is LIGHT+'s)
# ---------------------------------------------------------------------------------------------
_FUSE_BOTH = "Extract and fuse high-quality features from both images."

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "ivif": (
        "Please generate a fused image that preserves both the thermal information from the "
        "infrared modality and the texture details from the visible modality.",
        "Fuse the infrared and visible images, keeping the salient thermal targets and the "
        "fine visible textures.",
        "Combine the two modalities into one image with clear thermal targets and rich "
        "background details.",
    ),
    "mff": (
        "Detect sharp regions via Laplacian focus measures, create an all-in-focus mask, and seamlessly "
        "blend them to produce a tack-sharp photo from foreground to background without visible seams.",
        "Please generate an all-in-focus image that keeps the sharp regions of both images.",
        "Fuse the two differently focused images into one image that is sharp everywhere.",
        "Merge the in-focus areas of both images into a single fully focused image.",
    ),
    "mef": (
        "Merge the well-exposed mid-tones of image 1 with the shadow details of image 2, apply locally "
        "adaptive tone mapping to preserve texture contrast, and ensure natural global luminance.",
        "Please generate a well-exposed image that keeps the details of both the over-exposed "
        "and the under-exposed image.",
        "Fuse the two exposures into one image with balanced brightness and full detail.",
        "Combine the bright and dark exposures into a single image with natural exposure.",
    ),
    "m3": (
        _FUSE_BOTH,
        "Fuse the complementary information of both images into one clean, high-quality image.",
        "Combine the undamaged content of the two images into a single high-quality image.",
    ),
    "seg": (
        "Segment the {cls} in the image.",
        "Please segment the {cls} in the image.",
        "Highlight the {cls} in the image with a segmentation mask.",
    ),
}

# CONTROL: the fusion instruction followed by the photometric request (published form:
# "Extract and fuse ... both images. Slightly brighten the critical elements ...").
CONTROL_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "LIGHT++": ("Significantly brighten the critical elements to make them stand out clearly.",
                "Strongly increase the brightness of the image."),
    "LIGHT+": ("Slightly brighten the critical elements to make them stand out subtly.",
               "Slightly increase the brightness of the image."),
    "LIGHT-": ("Slightly darken the image to reduce its brightness subtly.",
               "Slightly decrease the brightness of the image."),
    "LIGHT--": ("Significantly darken the image to reduce its brightness strongly.",
                "Strongly decrease the brightness of the image."),
    "CONTRAST+": ("Increase the contrast to make the details more distinct.",
                  "Enhance the contrast of the image."),
    "CONTRAST-": ("Decrease the contrast to make the image softer.",
                  "Reduce the contrast of the image."),
}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def instruction_for(task: str, *, subtask: str | None = None, cls: str | None = None,
                    rng: random.Random | None = None, base_task: str = "m3") -> str:
    """Draw an instruction from the task's pool; index 0 (the published one) when rng is None.

    For `control`, the instruction is the base fusion instruction (of `base_task`) followed by the
    subtask's photometric request. For `seg`, `cls` names the class to segment.
    """
    _check_task(task)
    pick = (lambda pool: pool[0]) if rng is None else (lambda pool: rng.choice(pool))
    if task == "control":
        if subtask not in CONTROL_INSTRUCTIONS:
            raise ValueError(f"control needs a subtask in {', '.join(CONTROL_SUBTASKS)}, got {subtask!r}")
        base = _FUSE_BOTH if base_task == "m3" else pick(INSTRUCTIONS[base_task])
        return f"{base} {pick(CONTROL_INSTRUCTIONS[subtask])}"
    if task == "seg":
        if not cls:
            raise ValueError("seg needs the class name to segment (cls=...)")
        return pick(INSTRUCTIONS["seg"]).format(cls=cls)
    return pick(INSTRUCTIONS[task])


def build_prompt(task: str, instruction: str, *, subtask: str | None = None, tags: bool = True) -> str:
    """The full DiTFuse prompt for one sample.

    `subtask` is the control subtask (LIGHT+, ...) for `control`; fusion subtasks come from the
    task itself. `tags=False` is the ablation without task/subtask tags.
    """
    _check_task(task)
    head = ""
    if tags:
        sub = FUSION_SUBTAG.get(task)
        if task == "control":
            if subtask not in CONTROL_SUBTASKS:
                raise ValueError(f"control needs a subtask in {', '.join(CONTROL_SUBTASKS)}, got {subtask!r}")
            sub = f"<{subtask}>"
        head = f"{TASK_TAG[task]}. " + (f"{sub}. " if sub else "")
    instruction = instruction.strip()
    if not instruction.endswith("."):
        instruction += "."
    template = TEMPLATE_NO_REQUIREMENTS if task in NO_REQUIREMENTS_TASKS else TEMPLATE
    return template.format(head=head, instruction=instruction)


def default_prompt(task: str, *, subtask: str | None = None, cls: str | None = None,
                   tags: bool = True) -> str:
    """The published-instruction prompt for a task (what `ditfuse fuse --task` uses)."""
    return build_prompt(task, instruction_for(task, subtask=subtask, cls=cls), subtask=subtask, tags=tags)
