"""``python -m discvae`` and the ``discvae`` command: the CLI, with Ctrl-C at any point (even while torch is still
being imported) ending in one line on stderr and exit status 130."""
import sys


def main(argv=None) -> int:
    try:
        try:
            from .cli import main as cli_main
        except Exception as err:  # a Ctrl-C inside an import can surface as the importer's own error
            if _caused_by_interrupt(err):
                raise KeyboardInterrupt from None
            raise
        return cli_main(argv)
    except KeyboardInterrupt:
        print("discvae: interrupted", file=sys.stderr)
        return 130


def _caused_by_interrupt(err: BaseException | None) -> bool:
    """Whether ``err`` was raised while handling (or because of) a KeyboardInterrupt."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
