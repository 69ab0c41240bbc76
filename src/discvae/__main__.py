"""``python -m discvae`` and the ``discvae`` command: the CLI, with Ctrl-C at any point (even while torch is still
being imported) ending in one line on stderr and exit status 130."""
import sys


def main(argv=None) -> int:
    try:
        from .cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:
        print("discvae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
