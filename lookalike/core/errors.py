"""The one error family of Lookalike: every failure the project raises on purpose is a `LookalikeError`.

Each class says two things, so no caller keeps its own list of "known" exceptions:

- `status`: the HTTP status it maps to when it reaches a client of the servers (400 bad input, 404
  unknown thing, 413 too large, 503 something needed is down or unusable, 500 otherwise);
- `user_facing`: whether its message tells the user what to do. The command line prints such an error
  as one line without a traceback; a pipeline step prints it on its marked failure line; a server sends
  it to the client. Anything else (a bare `ValueError` from a bug) is an internal error: a traceback in
  the log, a 500 to the client, never a message that pretends the user did something wrong.

The family lives in `storage/` because every unit imports storage and nothing below it: the transformer
image (no torch) and the pipeline image share it. The middle classes below are what modules subclass;
`InputError` is also a `ValueError`, so code that validates values reads naturally.
"""
from __future__ import annotations


class LookalikeError(Exception):
    """A failure Lookalike raises on purpose; the message says what is wrong and what to do."""

    status: int = 500
    user_facing: bool = True


class InputError(LookalikeError, ValueError):
    """The caller's input (a request, a parameter, a file, a catalog row) cannot be used."""

    status = 400


class TooLargeError(InputError):
    """The input is larger than a limit allows."""

    status = 413


class NotFoundError(LookalikeError):
    """A named thing (a version, an alias, a model) does not exist."""

    status = 404


class UnavailableError(LookalikeError):
    """Something the work needs is down or unusable right now (the store, a damaged artifact)."""

    status = 503


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` carries a message for the user (shown as is, without a traceback)."""
    return isinstance(exc, LookalikeError) and exc.user_facing


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception maps to: its own for the family, 500 for anything else."""
    return int(getattr(exc, "status", 500)) if isinstance(exc, LookalikeError) else 500
