"""Error messages on one line: what a user sees of an exception another library raised."""


def one_line(error: BaseException, limit: int | None = None) -> str:
  """`error`'s message with its whitespace (newlines too) collapsed, or its type's name when it
  has none; cut to `limit` characters (ending in '...') when given."""
  text = " ".join(str(error).split()) or type(error).__name__
  if limit is None or len(text) <= limit:
    return text
  return text[: limit - 3] + "..."
