"""One error path: every failure a user can cause or meet ends in one line on stderr,

    segkd: error: <what went wrong, naming the flag, file or value>

and an exit code that says which kind it was (README: "Errors, exit codes and faults"):

    2    usage or data: a bad flag or value, a missing or unreadable file, a dataset that does not fit, a
         checkpoint that cannot be resumed; fix the input and run again
    1    runtime: the run itself failed (non-finite loss or weights, disk full, the run directory in use,
         a device error, an internal error); what was saved before is intact
    130  interrupted (Ctrl-C / SIGINT); the last checkpoint is intact and `--resume auto` continues from it

No traceback is printed unless the user asks for one: SEGKD_DEBUG=1 in the environment re-raises the original
exception. Under torchrun every rank that fails prints its own line, tagged with its rank.
"""
import errno
import os
import sys

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class SegkdError(RuntimeError):
    """A runtime failure with a message written for the user (exit code 1)."""


class DiskFullError(SegkdError):
    pass


class RunDirectoryBusy(SegkdError):
    pass


class NonFiniteError(SegkdError):
    """A loss term, weight or buffer went non-finite; the message names which and what was kept."""


USAGE = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


def exit_code(error):
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, SegkdError):
        return EXIT_RUNTIME
    return EXIT_USAGE if isinstance(error, USAGE) else EXIT_RUNTIME


def message(error):
    """The one line for `error`: its own message where it was written for the user, else what it is."""
    if isinstance(error, KeyboardInterrupt):
        return ("interrupted; the last checkpoint is intact: run the same command again to resume "
                "(--resume auto)")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return f"no space left on the device{where}; free some space (earlier checkpoints are intact)"
    if isinstance(error, (SegkdError, ValueError, FileNotFoundError)) or type(error).__module__.startswith("engine"):
        text = str(error)
    elif isinstance(error, OSError):
        text = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    elif any(k in str(error) for k in ("gloo", "NCCL", "Connection reset by peer", "connectFullMesh")):
        text = (f"lost contact with another process of this run ({first_line(error)[:240]}); with torchrun "
                "--max-restarts=N the group restarts and resumes from the last checkpoint")
    else:
        text = f"{type(error).__name__}: {error} (an internal error: rerun with SEGKD_DEBUG=1 for the traceback)"
    if "Traceback (most recent call last)" in text:  # an exception rebuilt from a worker's traceback text
        text = text.strip().splitlines()[-1]
    return " ".join(text.split())


def first_line(error):
    """`error` as `Type: its first line`: the reason of a failed load, which torch spells over many lines."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def debugging():
    return os.environ.get("SEGKD_DEBUG", "") not in ("", "0")


def run_cli(main, argv=None):
    """Call main(argv); turn any failure into the one line and its exit code (module docstring)."""
    try:
        main(argv)
    except SystemExit:
        raise
    except BaseException as error:  # KeyboardInterrupt included
        if debugging():
            raise
        rank = os.environ.get("RANK")
        tag = f" (rank {rank})" if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"segkd: error{tag}: {message(error)}", file=sys.stderr, flush=True)
        sys.exit(exit_code(error))
