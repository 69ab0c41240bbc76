"""MkDocs hooks: the command-line reference (docs/reference/cli.md) is rendered at build time from discvae's own
argparse parsers, so it cannot drift from the code: the marker ``<!-- discvae-cli -->`` becomes every subcommand's
``--help``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

MARKER = "<!-- discvae-cli -->"
ROOT = Path(__file__).resolve().parents[1]


def cli_reference() -> str:
    """Markdown: ``discvae --help`` and, per subcommand, a heading and its ``--help`` (100 columns wide)."""
    sys.path.insert(0, str(ROOT / "src"))
    os.environ["COLUMNS"] = "100"  # argparse wraps at $COLUMNS
    from discvae.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    parts = ["```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in subcommands.items():
        parts += [f"## discvae {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
