"""The command line: the only code that knows argparse / LightningCLI and the data layer.

One module per `ditfuse` subcommand (`lightning_cli` for fit/validate/predict, `fuse`, `evaluate`,
`convert`, `sweep`, `shards`) plus `argparsing`; `ditfuse/cli.py` dispatches to them. Each parses,
builds its jobs and writes files; the work itself is library code below.
"""
