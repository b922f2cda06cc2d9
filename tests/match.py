"""`words`: a `pytest.raises(..., match=...)` pattern from an error's essential words.

Errors are checked on what they must say (the setting or file, the problem, the fix), in order,
not character by character: wording between those words may change, and messages quoted from
other libraries (json, gzip, pyarrow) differ between their versions.
"""

import re


def words(*fragments: object) -> str:
  """A regex matching the fragments (literal text, str() of each) in this order."""
  return "(?s)" + ".*".join(re.escape(str(f)) for f in fragments)
