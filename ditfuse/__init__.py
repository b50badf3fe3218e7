"""DiTFuse: instruction-driven image fusion with a LoRA-adapted OmniGen diffusion transformer."""

__version__ = "0.1.0"
