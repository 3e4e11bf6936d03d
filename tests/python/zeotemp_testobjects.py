"""Persistent classes used by the tests (importable by subprocesses too)."""

import persistent


class Item(persistent.Persistent):
    """A plain persistent object without conflict resolution."""

    def __init__(self, value=None):
        self.value = value

    def __repr__(self):
        return f"<Item {self.value!r}>"
