"""Errors raised inside an actor, as the caller reports them: one line, `Type: message`.

Ray re-raises a remote exception wrapped in a RayTaskError; an exception class whose constructor
does not take its own message back (most with several arguments) cannot even be unpickled, and
arrives as UnserializableException with only the remote traceback as text. Either way the caller
gets a RemoteError holding the original `Type: message` line."""

from __future__ import annotations

import re

from ray.exceptions import RayTaskError, UnserializableException

from pipeline.runtime.results import RemoteError, one_line


REMOTE_ERRORS = (RayTaskError, UnserializableException)


def remote_error(e: Exception) -> RemoteError:
    """`e` as raised by ray.get (one of REMOTE_ERRORS) -> the remote `Type: message` line."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, UnserializableException):
        return RemoteError(one_line(cause))
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # ends with the remote `Type: message`
    # a traceback names the type with its module (pipeline.storage.base.StorageError: ...): keep the type
    return RemoteError(re.sub(r"^(?:\w+\.)+(?=\w+: )", "", lines[-1]) if lines else type(e).__name__)
