"""Ground floor: what every layer shares and that imports nothing of the project.

`prompts` (task tags, templates, prompt pools: the data layer and the model read the same ones),
`images` (reading, decoding and converting images).
"""
