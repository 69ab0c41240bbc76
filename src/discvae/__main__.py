"""``python -m discvae`` and the ``discvae`` command: the CLI, with Ctrl-C at any point (even while torch is still
being imported) ending in one line on stderr and exit status 130."""
import os
import sys


def main(argv=None) -> int:
    """Run the CLI and return its exit status. A process started by torchrun ends here, streams flushed, without
    the interpreter's shutdown: gloo's worker threads free finished collectives' tensors after the caller has moved
    on and need the GIL for it, and one still doing so while the interpreter shuts down aborts the process
    ("terminate called without an active exception"; seen in about 1 of 5 two-rank runs under load). Everything
    the run writes is on disk by then (atomic, fsynced writes)."""
    code = _run(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # distributed.launched(), without importing torch here
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(argv=None) -> int:
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
