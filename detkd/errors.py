"""User-facing errors: the CLI prints their message without a traceback."""


class DetkdError(Exception):
    """An error whose message tells the user what is wrong and what to change."""


class DataError(DetkdError):
    """Bad input data; the message names the file and the problem."""


class ConfigError(DetkdError):
    """A recipe or argument problem; the message names the key."""
