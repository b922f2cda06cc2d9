"""switchjax.errors.one_line: exceptions of other libraries shown on one line."""

from switchjax.errors import one_line


def test_whitespace_collapses_and_an_empty_message_gives_the_type():
  assert one_line(ValueError("a\n  b\tc ")) == "a b c"
  assert one_line(KeyError()) == "KeyError"


def test_a_limit_cuts_with_an_ellipsis_only_when_needed():
  assert one_line(OSError("x" * 10), 10) == "x" * 10
  assert one_line(OSError("x" * 11), 10) == "x" * 7 + "..."
  assert one_line(OSError("x" * 500)) == "x" * 500
