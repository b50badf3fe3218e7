"""Files from outside: weights and adapters in OmniGen / DiTFuse / diffusers layouts, image pairs.

`weights` (safetensors headers, mmap loads, host-RAM checks), `convert` (original OmniGen and
official DiTFuse LoRA <-> this framework's format), `pairs` (finding pairs, the resize / pad /
restore of `ditfuse fuse` and `ditfuse predict`). Imports only `ditfuse.core`.
"""
