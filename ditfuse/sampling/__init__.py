"""The flow-matching process: `flow` (time sampling, x_t, velocity target, per-sample loss),
`solvers` (time grids and ODE steps), `sampler` (dual-CFG sampling with the KV cache).
Imports `ditfuse.model` and below; no Lightning.
"""
