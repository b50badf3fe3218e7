"""The network: typed presets (`config`), tokenizer, conditioning (prompt + images -> tokens and
the OmniGen attention mask), codec (pixels <-> latents), backbone (the OmniGen transformer),
LoRA, and the memory-budget tracer. Imports `ditfuse.interop` and `ditfuse.core`; no Lightning.
"""
