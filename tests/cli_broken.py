"""A module whose import fails, for ``cleanbreak run``'s bad-input test."""

raise RuntimeError("this module is broken on purpose")
