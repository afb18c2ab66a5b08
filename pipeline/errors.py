"""The one error class for bad input: run.py prints its message as `error: <one line>`, no traceback.

Every check of a user's config, file, path or cluster raises a subclass (ConfigError,
DataError, PreflightError) with a one-line message naming the key, file or row and what to
do. Anything else that escapes is our bug and keeps its traceback.
"""
from __future__ import annotations

import re


class UserError(ValueError):
    """Input the run cannot use; str(e) is one line that names what to change."""


# An actor whose __init__ raised reaches the driver as ActorDiedError holding only the
# creation task's traceback as text (ray/exceptions.py, ActorDiedError.__init__), so a user
# error raised there is recognised by its last traceback line.
_TRACEBACK_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(ConfigError|DataError|PreflightError|UserError): (.+)$", re.M)


def find_user_error(exc: BaseException | None, _depth: int = 0) -> str | None:
    """The one-line message of a user error inside `exc` (a Ray task/actor/Train error that wraps
    one, or its __cause__ chain), else None."""
    if exc is None or _depth > 20:
        return None
    cause = getattr(exc, "cause", None)   # RayTaskError, also as_instanceof_cause()'s dual class,
    if isinstance(cause, UserError):      # whose str() is the whole remote traceback
        return str(cause)
    if isinstance(exc, UserError):
        return str(exc)
    inner = [cause, getattr(exc, "controller_failure", None),
             *getattr(exc, "worker_failures", {}).values(), exc.__cause__, exc.__context__]
    for e in inner:
        if isinstance(e, BaseException) and e is not exc:
            found = find_user_error(e, _depth + 1)
            if found:
                return found
    if type(exc).__module__.startswith("ray."):   # traceback text of a remote failure
        hits = _TRACEBACK_LINE.findall(str(exc))
        if hits:
            return hits[-1][1].strip()
    return None
