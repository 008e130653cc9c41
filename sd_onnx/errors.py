"""The one error type a user sees: the CLI turns it into a single line and a non-zero exit."""


def first_line(e: BaseException, limit: int) -> str:
    """The first line of an exception's message, cut to `limit` characters, for a one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


class SdOnnxError(Exception):
    """A problem the user can act on (bad file, bad flag, missing provider)."""


class CheckpointError(SdOnnxError):
    """The checkpoint cannot be read, is unsafe, or does not match a supported family."""


class ModelFolderError(SdOnnxError):
    """A model folder is missing, incomplete or of an unexpected kind."""


class UsageError(SdOnnxError):
    """A flag or argument value is out of range."""
