"""Error messages on one line: what a user sees of an exception another library raised."""


def one_line(error: BaseException, limit: int | None = None) -> str:
  """`error`'s message with its whitespace (newlines too) collapsed, or its type's name when it
  has none; cut to `limit` characters (ending in '...') when given."""
  text = " ".join(str(error).split()) or type(error).__name__
  if limit is None or len(text) <= limit:
    return text
  return text[: limit - 3] + "..."


def unwritable_output(path, flag: str) -> str | None:
  """Why a file a command writes at the end (its --json, --output) could not be written, or
  None: checked before any work starts, so that a long run never ends in a traceback."""
  import os
  import pathlib

  if path is None:
    return None
  path = pathlib.Path(path)
  parent = path.parent if str(path.parent) else pathlib.Path(".")
  if path.is_dir():
    return f"{flag}={path} is a directory; give a file name."
  if not parent.is_dir():
    return f"{flag}={path}: the directory {parent} does not exist; create it or choose another."
  if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
    return f"{flag}={path} cannot be written (permissions); choose another path."
  return None
