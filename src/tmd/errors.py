"""The errors tmd raises for what a user can fix, and the warning it gives when it changes an input.

The ``tmd`` command prints a ``TmdError`` (and, by the convention the code has always followed, a
``ValueError``, ``FileNotFoundError`` or ``FileExistsError``) as one line naming the file, key or value
and what was expected, and exits with code 2; ``tmd --debug`` shows the traceback instead. The
subclasses also derive from the built-in type a caller would catch for them, so ``except ValueError``
keeps working for library users.
"""

from __future__ import annotations


class TmdError(Exception):
    """Something the user can fix; the message says which file, key or value, and what was expected."""


class ConfigError(TmdError, ValueError):
    """A config that cannot be used; the message says which key, from where, and what was expected."""


class ResumeError(ConfigError):
    """``--resume`` with a config that differs from the run's in keys that change the model or the training."""


class InputFileError(TmdError, ValueError):
    """A file tmd reads is truncated, corrupt or of the wrong kind."""


class OutputPathError(TmdError, OSError):
    """An output folder that cannot be created or written."""


class PromptError(TmdError, ValueError):
    """A prompt the text encoder cannot encode as written."""


class NonFiniteLossError(TmdError, RuntimeError):
    """A loss or gradient norm became NaN/inf; the run stops before the bad update touches weights."""


class TmdWarning(UserWarning):
    """tmd changed or ignored part of an input (a prompt cut to the text encoder's length, ...)."""
