"""Persistent classes used by the tests (importable by subprocesses too)."""

import persistent


class Item(persistent.Persistent):
    """A plain persistent object without conflict resolution."""

    def __init__(self, value=None):
        self.value = value

    def __repr__(self):
        return f"<Item {self.value!r}>"


class MergingCounter(persistent.Persistent):
    """A counter with some payload that resolves write conflicts by adding
    both sides' increments (as ``BTrees.Length`` does), keeping the
    payload. ``pad`` makes its record a predictable size (about
    ``len(pad)`` + 100 bytes), for tests of per-transaction byte limits."""

    def __init__(self, value=0, pad=""):
        self.value = value
        self.pad = pad

    def _p_resolveConflict(self, old, committed, new):
        merged = dict(committed)
        merged["value"] = committed["value"] + new["value"] - old["value"]
        return merged

    def __repr__(self):
        return f"<MergingCounter {self.value!r}>"
