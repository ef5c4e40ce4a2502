"""The errors minimoe raises for things a USER got wrong: a flag, a file, a config, a device.

Each carries one sentence naming the bad value and what would be valid. The command line turns
exactly these into `error: <message>` and exit status 2; anything else is a bug and keeps its
traceback. They also derive from the builtin a library caller would expect (ValueError for a bad
value, RuntimeError for an unusable backend), so `except ValueError` keeps working.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one sentence (never a traceback)."""


class ConfigError(UserError, ValueError):
    """An invalid model configuration; the message names the Config field."""


class OptionError(UserError, ValueError):
    """An invalid training/command option; the message names the option (as its CLI flag)."""


class DataError(UserError, ValueError):
    """A corpus or token file that is missing, unreadable, too small or malformed."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable, corrupt, or does not fit its model."""


class BackendError(UserError, RuntimeError):
    """A backend that was asked for and cannot be used (e.g. CuPy without a GPU)."""
