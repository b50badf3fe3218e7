"""The argparse parser of the plain `ditfuse` tools (shards, fuse, eval, convert, sweep).

argparse accepts any unambiguous prefix of a long option (`--out` for `--output-dir`), so a typo
or a half-remembered name silently sets some other option. Here prefixes are an error
(allow_abbrev=False, as `ditfuse fit|validate|predict` in ditfuse.commands.lightning_cli), and an unknown
option is answered with the nearest valid ones, in one line.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, NoReturn


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option of the parser and of its subcommands."""
    found = []
    for action in parser._actions:
        found += [o for o in action.option_strings if o.startswith("--")]
        for sub in (getattr(action, "choices", None) or {}).values() if isinstance(action, argparse._SubParsersAction) \
                else ():
            found += _option_strings(sub)
    return sorted(set(found) - {"--help"})


def did_you_mean(message: str, options: list[str]) -> str:
    """` (did you mean --a, --b?)` for the unknown options named in an argparse message, or ''."""
    if "unrecognized arguments" not in message:
        return ""
    unknown = re.findall(r"(--[\w-]+)", message.split("unrecognized arguments", 1)[1])
    hints = [h for u in unknown for h in difflib.get_close_matches(u, options, n=1, cutoff=0.6)]
    hints += [o for u in unknown for o in options if o.startswith(u) and o not in hints][:3]  # a prefix
    return f" (did you mean {', '.join(dict.fromkeys(hints))}?)" if hints else ""


class StrictParser(argparse.ArgumentParser):
    """ArgumentParser without prefix matching, with did-you-mean on an unknown option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line (not argparse's usage block first), as the Lightning subcommands answer."""
        self.exit(2, f"{self.prog}: error: {message}{did_you_mean(message, _option_strings(self))}\n"
                     f"(`{self.prog} --help` lists every option)\n")
