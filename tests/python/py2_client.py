# -*- coding: utf-8 -*-
"""A stock Python 2.7 ZEO 5 / ZODB 5 client, driven by test_py2_clients.py.

Run with the Python 2 venv's interpreter (target/py2venv/bin/python):

    py2_client.py HOST:PORT STORAGE [CLIENT_LABEL]

It opens one ``ZEO.ClientStorage`` and one ``ZODB.DB`` connection (with its
own transaction manager) and then executes commands, one JSON object a line
on stdin; each gets one JSON line on stdout: ``{"ok": true, ...}`` or
``{"ok": false, "error": TYPE, "message": ..., "traceback": ...}``. ZEO's
logging goes to stderr. Nothing here is zeotemp-specific: it is what a
Plone 5.2 / Zope 4 process on Python 2.7 does through the same APIs.

Values are described to the test as ``[type, payload]`` pairs (see
``describe``), so the Python 3 side can compare types exactly: ``str``
(py2 native str, payload latin-1 decoded), ``unicode``, ``binary``
(zodbpickle.binary, what ZODB 5 on py2 gives for a py3 ``bytes``),
``int``, ``long``, ``float``, ``list``, ``tuple``, ``dict``, ``pmapping``,
``oobtree``.

Stays importable without ZEO (pytest never imports it, but keep it plain).
"""

from __future__ import print_function

import json
import logging
import sys
import time
import traceback


def describe(v, depth=0):
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping
    from zodbpickle import binary

    if depth > 20:
        raise ValueError("too deep")
    if v is None or isinstance(v, bool):
        return [type(v).__name__, v]
    if isinstance(v, binary):
        return ["binary", v.encode("hex")]
    if isinstance(v, str):
        return ["str", v.decode("latin-1")]
    if isinstance(v, unicode):  # noqa: F821 (py2)
        return ["unicode", v]
    if isinstance(v, (int, long, float)):  # noqa: F821 (py2)
        # JSON cannot hold 2**70 exactly everywhere: send longs as text.
        if isinstance(v, long):  # noqa: F821 (py2)
            return ["long", str(v)]
        return [type(v).__name__, v]
    if isinstance(v, (list, tuple)):
        return [type(v).__name__, [describe(x, depth + 1) for x in v]]
    if isinstance(v, dict):
        return ["dict", sorted([describe(k, depth + 1), describe(x, depth + 1)]
                               for k, x in v.items())]
    if isinstance(v, PersistentMapping):
        return ["pmapping", {"oid": v._p_oid.encode("hex"),
                             "items": sorted([describe(k, depth + 1),
                                              describe(x, depth + 1)]
                                             for k, x in v.items())}]
    if isinstance(v, OOBTree):
        return ["oobtree", {"oid": v._p_oid.encode("hex"),
                            "items": [[describe(k, depth + 1),
                                       describe(x, depth + 1)]
                                      for k, x in v.items()]}]
    raise TypeError("cannot describe %r" % (type(v),))


class Client(object):

    def __init__(self, address, storage, label=None):
        import transaction
        import ZEO.ClientStorage
        import ZODB

        self.storage = ZEO.ClientStorage.ClientStorage(
            address, storage=storage, wait_timeout=30, client_label=label)
        self.db = ZODB.DB(self.storage)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(transaction_manager=self.tm)
        self.root = self.conn.root()
        self.racy_invalidations = _zeo_version() < (5, 2, 3)

    # -- commands (each returns a dict merged into the reply) -----------

    def op_versions(self):
        import pkg_resources
        names = ["ZEO", "ZODB", "BTrees", "persistent", "transaction",
                 "zodbpickle"]
        return {"python": sys.version.split()[0],
                "versions": dict((n, pkg_resources.get_distribution(n).version)
                                 for n in names),
                "btrees_c": _btrees_is_c()}

    def op_write_values(self, key):
        """Commits root[key]: every kind of value a py2 app stores."""
        from BTrees.OOBTree import OOBTree
        from persistent.mapping import PersistentMapping
        from zodbpickle import binary

        self.tm.begin()
        child = PersistentMapping()
        child["name"] = "child"
        tree = OOBTree()
        for i in range(40):  # more than one bucket (max 30 per bucket)
            tree["k%03d" % i] = i * i
        tree[u"caf\xe9"] = u"\u2603"
        pm = PersistentMapping()
        pm["str"] = "plain ascii str"
        pm["unicode"] = u"caf\xe9 \u2603"
        pm["binary"] = binary(b"\x00\x01\xfe\xff")
        pm["int"] = 42
        pm["negative"] = -7
        pm["maxint"] = sys.maxsize
        pm["long"] = 2 ** 70
        pm["float"] = 1.5
        pm["none"] = None
        pm["bool"] = True
        pm["list"] = [1, "two", u"three"]
        pm["tuple"] = (1, 2)
        pm["dict"] = {"a": 1, u"b": 2}
        pm["child"] = child
        pm["child_again"] = child  # the same persistent object twice
        pm["tree"] = tree
        self.root[str(key)] = pm
        # A py2 str that is not ASCII: ZODB on Python 3 cannot load it
        # (its unpickler decodes py2 str as ASCII; zodbupdate converts such
        # databases), so it lives in an object only Python 2 reads.
        raw = PersistentMapping()
        raw["str_high"] = "\x00\xff\x80raw"
        self.root[str(key) + "_py2only"] = raw
        self.tm.commit()
        return {"tid": self.root[str(key)]._p_serial.encode("hex"),
                "oid": pm._p_oid.encode("hex")}

    def op_read(self, key, sync=True):
        if sync:
            self.tm.begin()
        v = self.root.get(str(key))
        out = {"value": describe(v) if v is not None else None}
        if isinstance(v, dict) or hasattr(v, "keys"):
            try:
                out["same_child"] = v["child"] is v["child_again"]
            except (KeyError, TypeError):
                pass
        return out

    def _mapping(self, container):
        """The root, or the mapping root[container] (a client that must
        not rewrite the root, e.g. ZODB 5.3 next to Python 3 clients)."""
        return self.root if container is None else self.root[str(container)]

    def op_set(self, key, value, container=None):
        self.tm.begin()
        m = self._mapping(container)
        m[str(key)] = value
        self.tm.commit()
        return {"tid": m._p_serial.encode("hex")}

    def op_get(self, key, sync=True, container=None):
        if sync:
            self.tm.begin()
        return {"value": describe(self._mapping(container).get(str(key)))}

    def op_length_add(self, name, n):
        """Starts a transaction that changes root[name] (a BTrees.Length)
        by n and leaves it open: ``commit`` finishes it."""
        self.tm.begin()
        self.root[str(name)].change(n)
        return {}

    def op_wait_length(self, name, value, seconds):
        """Polls root[name]() == value (a BTrees.Length), as op_wait_for."""
        deadline = time.time() + seconds
        polls = 0
        while True:
            self._poll(polls)
            polls += 1
            current = self.root[str(name)]()
            if current == value or time.time() > deadline:
                return {"value": current, "polls": polls}
            time.sleep(0.05)

    def _poll(self, polls):
        """Starts the transaction of a poll for another client's commit.

        ZEO before 5.2.3 (Plone 5.1's 5.1.2, Plone 5.2's 5.2.1) has a race
        of its own (ZEO issue 166): the client advances lastTransaction()
        only after handing the invalidation to ZODB, so a poll in between
        consumes the invalidation but reloads the object as of the old
        tid, and the connection keeps that old state for good. With those
        versions, a poll that did not see the value yet ghostifies the
        connection's objects, so they are loaded again through the ZEO
        client cache: that only holds the new state if the server's
        invalidateTransaction named the object (and lastTransaction() only
        advances on the server's pushes), so a lost or wrong invalidation
        still fails the test.
        """
        self.tm.begin()
        if polls and self.racy_invalidations:
            self.conn.cacheMinimize()

    def op_wait_for(self, key, value, seconds, container=None):
        """Polls root[key] (or root[container][key]) == value, starting a
        new transaction each time (no reconnect): only an invalidation from
        the server makes the cached object show a new value."""
        deadline = time.time() + seconds
        polls = 0
        while True:
            self._poll(polls)
            polls += 1
            current = self._mapping(container).get(str(key))
            if current == value:
                return {"polls": polls}
            if time.time() > deadline:
                raise AssertionError(
                    "root[%r] is %r after %ss, want %r"
                    % (key, current, seconds, value))
            time.sleep(0.05)

    def op_tree_insert(self, tree, key, value):
        """Starts a transaction that inserts into root[tree] (an OOBTree)
        and leaves it open: ``commit`` finishes it."""
        self.tm.begin()
        t = self.root[str(tree)]
        t[str(key)] = value
        return {"tree_len": len(t)}

    def op_commit(self):
        self.tm.commit()
        return {"tid": self.storage.lastTransaction().encode("hex")}

    def op_abort(self):
        self.tm.abort()
        return {}

    def op_tree_items(self, tree, min_len=0, seconds=10):
        """The items of root[tree], once it has min_len of them (polled
        with new transactions, as op_wait_for)."""
        deadline = time.time() + seconds
        polls = 0
        while True:
            self._poll(polls)
            polls += 1
            t = self.root[str(tree)]
            if len(t) >= min_len or time.time() > deadline:
                return {"items": [[describe(k), describe(v)]
                                  for k, v in t.items()]}
            time.sleep(0.05)

    def op_commit_meta(self, key):
        """Commits root[key] = 1 with a user, a unicode note and an
        extension holding an ASCII str, a non-ASCII str and a unicode
        value (what Zope puts there is py2 str); returns the history entry
        this client reads back."""
        txn = self.tm.begin()
        txn.setUser("bob")
        txn.note(u"caf\xe9")
        txn.setExtendedInfo("plain", "ascii value")
        txn.setExtendedInfo("high", "\xff\xfe")
        txn.setExtendedInfo(u"uni", u"\u2603")
        self.root[str(key)] = 1
        self.tm.commit()
        return self.op_history()

    def op_history(self):
        """The root's latest history entry, described."""
        h = self.storage.history(self.root._p_oid, 1)[0]
        return {"history": dict((k, describe(v)) for k, v in h.items())}

    def op_commit_retry(self, key, value, seconds):
        """Commits root[key] = value, retrying on transient errors (a
        server restart: ClientDisconnected, ConflictError) for up to
        ``seconds``; returns the root's keys afterwards."""
        from ZEO.Exceptions import ClientDisconnected
        from ZODB.POSException import ConflictError
        deadline = time.time() + seconds
        attempts = 0
        while True:
            attempts += 1
            try:
                self.tm.begin()
                self.root[str(key)] = value
                self.tm.commit()
                break
            except (ClientDisconnected, ConflictError) as e:
                self.tm.abort()
                if time.time() > deadline:
                    raise AssertionError("no recovery after %ss (%d attempts,"
                                         " last %r)" % (seconds, attempts, e))
                time.sleep(0.5)
        self.tm.begin()
        return {"keys": sorted(self.root.keys()), "attempts": attempts}

    def op_counter_loop(self, key, n):
        """n commits, each incrementing root[key] (an int), retrying on
        ConflictError; returns the final value seen."""
        from ZODB.POSException import ConflictError
        conflicts = 0
        for _ in range(n):
            for attempt in range(50):
                try:
                    self.tm.begin()
                    self.root[str(key)] = self.root.get(str(key), 0) + 1
                    self.tm.commit()
                    break
                except ConflictError:
                    self.tm.abort()
                    conflicts += 1
                    time.sleep(0.01 * (attempt + 1))
            else:
                raise AssertionError("gave up after 50 conflicts")
        self.tm.begin()
        return {"value": self.root[str(key)], "conflicts": conflicts}

    def op_errors(self):
        """Error replies in the py2 dialect: POSKeyError, an unresolvable
        ConflictError, history, undo, pack."""
        import transaction
        from persistent.mapping import PersistentMapping
        from ZODB.POSException import ConflictError, POSKeyError
        from ZODB.utils import p64, z64

        out = {}
        try:
            self.storage.load(p64(0x7fffffffffff), "")
        except POSKeyError as e:
            out["poskeyerror"] = repr(e)
        # Unresolvable conflict: two connections of this client change the
        # same PersistentMapping.
        self.tm.begin()
        self.root["contested"] = PersistentMapping()
        self.tm.commit()
        tm2 = transaction.TransactionManager()
        conn2 = self.db.open(transaction_manager=tm2)
        try:
            tm2.begin()
            self.tm.begin()
            conn2.root()["contested"]["x"] = 1
            self.root["contested"]["x"] = 2
            tm2.commit()
            try:
                self.tm.commit()
            except ConflictError as e:
                out["conflict"] = {"type": type(e).__name__,
                                   "oid": (e.oid or "").encode("hex"),
                                   "class_name": e.class_name}
                self.tm.abort()
        finally:
            tm2.abort()
            conn2.close()
        # A read conflict: checkCurrentSerialInTransaction fails at vote.
        from ZODB.POSException import ReadConflictError
        tm2 = transaction.TransactionManager()
        conn2 = self.db.open(transaction_manager=tm2)
        try:
            self.tm.begin()
            tm2.begin()
            contested = self.root["contested"]
            self.conn.readCurrent(contested)
            contested._p_activate()
            conn2.root()["contested"]["y"] = 1
            tm2.commit()
            self.root["other"] = 1
            try:
                self.tm.commit()
            except ReadConflictError as e:
                out["read_conflict"] = {"type": type(e).__name__,
                                        "oid": (e.oid or "").encode("hex")}
                self.tm.abort()
        finally:
            tm2.abort()
            conn2.close()
        hist = self.storage.history(z64, 2)
        out["history"] = [{"keys": sorted(h.keys()),
                           "tid_type": type(h["tid"]).__name__,
                           "user_type": type(h["user_name"]).__name__}
                          for h in hist]
        out["undo_log"] = list(self.db.undoLog())
        self.db.pack(time.time())
        out["after_pack_root_keys"] = len(self.root.keys())
        return out

    def op_close(self):
        self.conn.close()
        self.db.close()
        return {}


def _zeo_version():
    import pkg_resources
    version = pkg_resources.get_distribution("ZEO").version
    return tuple(int(x) for x in version.split(".")[:3] if x.isdigit())


def _btrees_is_c():
    from BTrees.OOBTree import OOBTree, OOBTreePy
    return OOBTree is not OOBTreePy


def main():
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="py2 %(levelname)s %(name)s: %(message)s")
    host, port = sys.argv[1].rsplit(":", 1)
    label = sys.argv[3] if len(sys.argv) > 3 else None
    client = Client((host, int(port)), sys.argv[2], label)
    reply({"ok": True, "ready": True,
           "last_tid": client.storage.lastTransaction().encode("hex")})
    for line in iter(sys.stdin.readline, ""):
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            result = getattr(client, "op_" + op)(**cmd)
            result["ok"] = True
        except Exception as e:
            result = {"ok": False, "error": type(e).__name__,
                      "message": repr(e), "traceback": traceback.format_exc()}
        reply(result)
        if op == "close":
            break


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
