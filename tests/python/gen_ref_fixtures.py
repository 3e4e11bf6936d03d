"""Build the golden fixtures for zeotemp's reference scanner (src/storage/refs.rs).

Real objects are committed with ZODB to in-memory MappingStorages; every
stored record is read back raw with ``storage.load(oid)`` and written as one
JSON line with its references as computed by ``ZODB.serialize.referencesf``
(deduplicated keeping first occurrences, as ``zeotemp::refs::references``).

Runs on Python 3 (the test venv, tests/python/requirements.txt) and on
Python 2.7 (ZODB 5.8.1, BTrees 4.9.2, persistent 4.7.0, zodbpickle 2.0.0,
transaction 3.1.0), so keep the syntax py2-compatible::

    /tmp/ptvenv/bin/python tests/python/gen_ref_fixtures.py fixtures/refs/py3.jsonl
    /tmp/py2venv/bin/python tests/python/gen_ref_fixtures.py fixtures/refs/py2.jsonl

Line format (keys sorted)::

    {"variant": ..., "category": ..., "name": ..., "oid": hex,
     "record": hex, "refs": [hex, ...], "oracle": ...}        # or
    {..., "error": true, "oracle": ...}                        # no "refs"

The first line is a header: ``{"header": true, "records": N,
"categories": [...], "variants": [...], "python": ..., "versions": {...}}``.

Variants:

* ``zodb``: records as this ZODB writes them (protocol 3).
* ``proto4`` (py3): the same objects written by the stdlib pickler at
  protocol 4 (FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL, sets,
  NEWOBJ_EX). zodbpickle's ``noload`` refuses protocol 4, so their refs come
  from the ``stdlib`` oracle below (checked equal to referencesf on every
  protocol-3 record first).
* ``proto2-codecs`` (py3): ZODB's writer forced to protocol 2. Python 3
  bytes then pickle as ``_codecs.encode(...)`` REDUCE calls, referencesf
  fails on them (AssertionError), and so must the scanner: ``"error": true``.
* ``legacy-proto1``, ``legacy-proto2`` (py2): ZODB's writer forced to
  protocol 1/2 with plain ``str`` oids, i.e. what ZODB 3.x/4.x wrote on
  Python 2: oids as SHORT_BINSTRING.
* ``hand``: edge records written by hand, expected outcome set by hand
  (``"oracle": "hand"``).
"""
from __future__ import print_function

import binascii
import datetime
import decimal
import io
import json
import os
import sys

import transaction
import ZODB
import ZODB.serialize
from BTrees.IOBTree import IOBTree
from BTrees.Length import Length
from BTrees.LOBTree import LOBTree
from BTrees.OIBTree import OIBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef
from ZODB.serialize import referencesf

PY2 = sys.version_info[0] == 2
if PY2:
    import zodbpickle.pickle as oracle_pickle
else:
    import pickle as oracle_pickle

# Buckets kept per BTree category (all BTree nodes are kept): enough to
# show bucket chaining without a megabyte of fixtures.
MAX_BUCKETS = 24


class Item(Persistent):
    """A plain persistent object."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class NewArgs(Persistent):
    """Class pickle is (klass, args); references to it are bare oids."""

    def __init__(self, a, b):
        self.a = a
        self.b = b

    def __getnewargs__(self):
        return (self.a, self.b)


class Plain(object):
    """A non-persistent object inside a state (NEWOBJ / copyreg)."""

    def __init__(self, x):
        self.x = x


class PlainEx(object):
    """Pickles with NEWOBJ_EX at protocol 4."""

    def __new__(cls, *args, **kw):
        return object.__new__(cls)

    def __init__(self, x, flag=False):
        self.x = x
        self.flag = flag

    def __getnewargs_ex__(self):
        return (self.x,), {'flag': self.flag}


def hexs(b):
    return binascii.hexlify(b).decode('ascii')


def dedup(oids):
    seen = set()
    out = []
    for o in oids:
        if o not in seen:
            seen.add(o)
            out.append(o)
    return out


def zodb_refs(record):
    """referencesf, deduplicated; None if it fails."""
    try:
        return dedup(referencesf(record))
    except Exception:
        return None


def refs_of(record):
    """For the generator's own checks: referencesf, else the stdlib oracle."""
    refs = zodb_refs(record)
    return stdlib_refs(record) if refs is None else refs


class _Stub(object):
    def __init__(self, *args, **kw):
        pass

    def __setstate__(self, state):
        pass


class _OracleUnpickler(oracle_pickle.Unpickler):
    """Loads with every class replaced by _Stub, recording persistent ids."""

    def find_class(self, module, name):
        return _Stub

    def persistent_load(self, pid):
        self.pids.append(pid)
        return None


def stdlib_refs(record):
    """referencesf's rules over a full (stubbed) load by the pure pickler."""
    u = _OracleUnpickler(io.BytesIO(record))
    u.pids = []
    u.load()
    u.load()
    oids = []
    for ref in u.pids:
        if isinstance(ref, tuple):
            oid = ref[0]
        elif isinstance(ref, (bytes, str)):
            oid = ref
        else:
            assert isinstance(ref, list)
            continue
        if not isinstance(oid, bytes):
            oid = oid.encode('ascii')
        oids.append(oid)
    return dedup(oids)


def all_records(storage):
    """(oid, record) of the current revision of every stored object."""
    oids = set()
    for txn in storage.iterator():
        for rec in txn:
            oids.add(rec.oid)
    out = []
    for oid in sorted(oids):
        data = storage.load(oid)[0]
        out.append((oid, data))
    return out


class _NameUnpickler(_OracleUnpickler):
    def find_class(self, module, name):
        return (module, name)


def first_pickle_length(record):
    f = io.BytesIO(record)
    u = _NameUnpickler(f)
    u.pids = []
    u.load()
    return f.tell()


def class_name(record):
    """Module.Name from the class pickle, for the record's name."""
    try:
        u = _NameUnpickler(io.BytesIO(record))
        u.pids = []
        meta = u.load()
        while isinstance(meta, tuple) and meta and isinstance(meta[0], tuple):
            meta = meta[0]
        if isinstance(meta, tuple) and len(meta) == 2:
            return '%s.%s' % meta
    except Exception:
        pass
    return '?'


# --- scenarios: each builds objects in a fresh root and commits ---


def s_root_mapping(root, conn):
    root['a'] = PersistentMapping({'x': 1})
    root['b'] = PersistentList([1, 2, 3])
    root['c'] = Item(name=u'c', n=3)
    root['d'] = PersistentMapping()
    root['plain'] = {'nested': [1, (2, 3)], u'text': b'bytes'}
    transaction.commit()


def s_persistent_list(root, conn):
    children = [PersistentMapping({'i': i}) for i in range(4)]
    root['list'] = PersistentList(children + [u'text', 42, None, children[0]])
    transaction.commit()


def _btree(root, cls, keys, value):
    t = cls()
    for k in keys:
        t[k] = value(k)
    root['tree'] = t
    transaction.commit()


def s_oobtree(root, conn):
    # Sequential inserts split buckets in half (15 keys) and the root at 250
    # children: 8000 keys give a root whose children are BTree nodes.
    _btree(root, OOBTree, ['k%05d' % i for i in range(8000)], lambda k: 1)


def s_iobtree(root, conn):
    _btree(root, IOBTree, range(400), lambda k: 'v%d' % k)


def s_oibtree(root, conn):
    _btree(root, OIBTree, ['key-%04d' % i for i in range(200)], lambda k: len(k))


def s_lobtree(root, conn):
    _btree(root, LOBTree, [i * 1000003 for i in range(400)], lambda k: (k, u't'))


def s_length(root, conn):
    root['len'] = Length()
    root['len'].change(5)
    root['len2'] = Length(7)
    transaction.commit()


def s_weakref(root, conn):
    target = PersistentMapping({'t': 1})
    other = PersistentMapping()
    root['target'] = target
    root['other'] = other
    transaction.commit()
    holder = Item(weak=WeakRef(target), strong=other, weaks=[WeakRef(other)])
    root['holder'] = holder
    transaction.commit()
    return {'weak_target': target._p_oid, 'holder': holder._p_oid}


def check_weakref(records, ctx):
    refs = dict((oid, refs_of(rec)) for oid, rec in records)
    holder = refs[ctx['holder']]
    assert ctx['weak_target'] not in holder, 'weak reference followed'
    assert holder, 'holder has a strong reference too'


def s_transience(root, conn):
    # Products.Transience-like: timeslice -> session id -> session data.
    slices = OOBTree()
    root['_data'] = slices
    root['_length'] = Length()
    for ts in range(3):
        sessions = OOBTree()
        slices[1700000000 + ts * 60] = sessions
        for i in range(40):
            sid = '%08dA%sxyz' % (ts * 1000 + i, 'q' * 8)
            data = PersistentMapping()
            data['cart'] = {'items': [(u'sku-%d' % i, 2, decimal.Decimal('9.95'))],
                            'tags': set([1, 2, 3]), 'frozen': frozenset([u'a'])}
            data['when'] = datetime.datetime(2024, 5, 1, 12, i % 60, 0)
            data['day'] = datetime.date(2024, 5, 1)
            data['seen'] = [1.5, -(2 ** 70), True, None, (u'x', b'y')]
            data['obj'] = Plain(i)
            sessions[sid] = data
            root['_length'].change(1)
        transaction.commit()


def s_memo_shared(root, conn):
    child = PersistentMapping({'c': 1})
    shared = (u'shared', child, [1, 2])
    root['holder'] = Item(t1=shared, t2=shared, c1=child, c2=child, lst=[child, child])
    transaction.commit()


def s_getnewargs(root, conn):
    na = NewArgs(u'a', 2)
    root['na'] = na
    root['list'] = PersistentList([na, na, NewArgs(u'b', 3)])
    transaction.commit()


def s_many_refs(root, conn):
    children = [PersistentMapping() for i in range(320)]
    late = [Item(n=i) for i in range(3)]  # a class memoized after index 255
    big = PersistentList(children + late + [children[-1], late[0], children[5]])
    root['big'] = big
    transaction.commit()
    return {'big': big._p_oid}


def check_many_refs(records, ctx):
    rec = dict(records)[ctx['big']]
    refs = refs_of(rec)
    assert len(refs) == 323, len(refs)
    if not PY2 and rec[:2] == b'\x80\x03':
        import pickletools
        ops = set(op.name for op, _, _ in pickletools.genops(rec[first_pickle_length(rec):]))
        assert 'LONG_BINPUT' in ops and 'LONG_BINGET' in ops, ops


def s_plain_objects(root, conn):
    root['objs'] = Item(plain=Plain([1, 2]), ex=PlainEx(u'x', flag=True),
                        dec=decimal.Decimal('1.25'), big=2 ** 100, neg=-5,
                        f=3.25, s=set([u'a']), fs=frozenset([1]),
                        dt=datetime.datetime(2020, 1, 2, 3, 4, 5, 6), b=b'\x00\xff',
                        u=u'\xe9\u20ac', t=(), child=PersistentMapping())
    transaction.commit()


def check_btree(records, ctx):
    """The tree's records reference buckets, and buckets their next one."""
    names = dict((oid, class_name(rec)) for oid, rec in records)
    refs = dict((oid, refs_of(rec)) for oid, rec in records)
    buckets = [o for o, n in names.items() if n.endswith('Bucket')]
    trees = [o for o, n in names.items() if n.endswith('BTree')]
    assert len(buckets) >= 3, len(buckets)
    chained = [o for o in buckets if refs[o] and names[refs[o][0]].endswith('Bucket')]
    assert len(chained) == len(buckets) - 1, 'every bucket but the last has a next'
    assert any(len(refs[t]) >= 2 for t in trees)
    if ctx and ctx.get('interior'):
        interior = [t for t in trees if any(names.get(r, '').endswith('BTree') for r in refs[t])]
        assert interior, 'no BTree node with BTree children'


SCENARIOS = [
    ('root-mapping', s_root_mapping, None),
    ('persistent-list', s_persistent_list, None),
    ('oobtree', s_oobtree, check_btree),
    ('iobtree', s_iobtree, check_btree),
    ('oibtree', s_oibtree, check_btree),
    ('lobtree', s_lobtree, check_btree),
    ('length', s_length, None),
    ('weakref', s_weakref, check_weakref),
    ('transience', s_transience, None),
    ('memo-shared', s_memo_shared, None),
    ('getnewargs', s_getnewargs, None),
    ('many-refs', s_many_refs, check_many_refs),
    ('plain-objects', s_plain_objects, None),
]


def sample(category, records):
    """Drop identical records; keep MAX_BUCKETS buckets of a big tree."""
    out = []
    seen = set()
    buckets = 0
    for oid, rec in records:
        if rec in seen:
            continue
        seen.add(rec)
        if category.endswith('btree') and class_name(rec).endswith('Bucket'):
            buckets += 1
            if buckets > MAX_BUCKETS:
                continue
        out.append((oid, rec))
    return out


def run_scenario(category, build, check):
    db = ZODB.DB(None)
    try:
        conn = db.open()
        ctx = build(conn.root(), conn) or {}
        if category == 'oobtree':
            ctx['interior'] = True
        records = all_records(db.storage)
        if check is not None:
            check(records, ctx)
        transaction.abort()
        conn.close()
    finally:
        db.close()
    return records


def cross_db():
    """A multi-database: references into 'other' are ['m', ...] / ['n', ...]
    and a weak one ['w', (oid, 'other')]; none is followed."""
    databases = {}
    main = ZODB.DB(None, databases=databases, database_name='main')
    other = ZODB.DB(None, databases=databases, database_name='other')
    try:
        conn = main.open()
        conn2 = conn.get_connection('other')
        far = PersistentMapping({'far': 1})
        far_na = NewArgs(u'far', 1)
        conn2.root()['far'] = far
        conn2.root()['far_na'] = far_na
        transaction.commit()
        near = PersistentMapping()
        holder = Item(far=far, far_na=far_na, weak=WeakRef(far), near=near)
        conn.root()['holder'] = holder
        transaction.commit()
        records = all_records(main.storage)
        refs = dict((oid, zodb_refs(rec)) for oid, rec in records)
        assert refs[holder._p_oid] == [near._p_oid], refs[holder._p_oid]
        raw = dict(records)[holder._p_oid]
        assert b'other' in raw
        records = [('main', oid, rec) for oid, rec in records]
        records += [('other', oid, rec) for oid, rec in all_records(other.storage)]
        transaction.abort()
        conn.close()
    finally:
        main.close()
        other.close()
    return records


def line(variant, category, oid, rec, refs, oracle, label=None):
    d = {'variant': variant, 'category': category,
         'name': '%s/%s/%s' % (variant, category, label or class_name(rec)),
         'oid': hexs(oid), 'record': hexs(rec), 'oracle': oracle}
    if refs is None:
        d['error'] = True
    else:
        d['refs'] = [hexs(o) for o in refs]
    return d


def collect(variant, oracle_fn=None, oracle_name='referencesf', scenarios=None):
    out = []
    runs = [(c, b, k) for c, b, k in SCENARIOS if scenarios is None or c in scenarios]
    for category, build, check in runs:
        for oid, rec in sample(category, run_scenario(category, build, check)):
            refs = zodb_refs(rec)
            if oracle_fn is not None:
                refs = oracle_fn(rec)
            elif refs is not None:
                # Cross-check the second oracle against referencesf.
                assert stdlib_refs(rec) == refs, (category, rec)
            out.append(line(variant, category, oid, rec, refs, oracle_name))
    if scenarios is None or 'cross-db' in scenarios:
        if oracle_fn is None:  # the multi-database run uses the default writer
            for db, oid, rec in cross_db():
                label = '%s:%s' % (db, class_name(rec))
                out.append(line(variant, 'cross-db', oid, rec, zodb_refs(rec), 'referencesf', label))
    return out


def hand_records(real):
    """Edge records with hand-set outcomes, built from a real record."""
    first_len = first_pickle_length(real)
    assert real[first_len - 1:first_len] == b'.' and zodb_refs(real)
    cases = [
        ('not-a-pickle', b'x', []),
        ('not-a-pickle-text', b'data', []),
        ('empty', b'', []),
        ('truncated', real[:len(real) // 2], None),
        ('truncated-before-stop', real[:-1], None),
        ('garbage-after-first-pickle', real[:first_len] + b'garbage', None),
        ('garbage-after-both-pickles', real + b'\x00', None),
        ('class-pickle-only', real[:first_len], []),
    ]
    return [line('hand', 'edge', b'\0' * 8, rec, refs, 'hand', name) for name, rec, refs in cases]


def versions():
    out = {}
    try:
        import pkg_resources
        for name in ('ZODB', 'BTrees', 'persistent', 'zodbpickle', 'transaction'):
            out[name] = pkg_resources.get_distribution(name).version
    except Exception:
        pass
    return out


def main(path):
    entries = collect('zodb')
    if PY2:
        for proto in (1, 2):
            ZODB.serialize._protocol = proto
            ZODB.serialize.binary = str  # ZODB 3/4 on Python 2: oids are str
            try:
                entries += collect('legacy-proto%d' % proto)
            finally:
                ZODB.serialize._protocol = 3
                ZODB.serialize.binary = persistent_binary
    else:
        import pickle

        def stdlib_pickler(persistent_id, f, protocol):
            p = pickle.Pickler(f, 4)
            p.persistent_id = persistent_id
            return p

        saved = ZODB.serialize.PersistentPickler
        ZODB.serialize.PersistentPickler = stdlib_pickler
        try:
            entries += collect('proto4', oracle_fn=stdlib_refs, oracle_name='stdlib')
        finally:
            ZODB.serialize.PersistentPickler = saved
        ZODB.serialize._protocol = 2
        try:
            p2 = collect('proto2-codecs', scenarios=['root-mapping', 'getnewargs', 'length'])
        finally:
            ZODB.serialize._protocol = 3
        assert any(e.get('error') for e in p2)
        entries += p2
    real = [e for e in entries if e['category'] == 'root-mapping' and e['oid'] == '00' * 8]
    entries += hand_records(binascii.unhexlify(real[0]['record']))

    header = {'header': True, 'records': len(entries),
              'categories': sorted(set(e['category'] for e in entries)),
              'variants': sorted(set(e['variant'] for e in entries)),
              'python': '%d.%d.%d' % sys.version_info[:3], 'versions': versions()}
    with open(path, 'wb') as f:
        for d in [header] + entries:
            f.write((json.dumps(d, sort_keys=True) + '\n').encode('ascii'))
    counts = {}
    for e in entries:
        key = (e['variant'], e['category'])
        counts[key] = counts.get(key, 0) + 1
    for key in sorted(counts):
        print('%-16s %-16s %4d' % (key[0], key[1], counts[key]))
    print('%d records -> %s' % (len(entries), path))


persistent_binary = ZODB.serialize.binary if PY2 else None

if __name__ == '__main__':
    if os.environ.get('PYTHONHASHSEED') != '0':
        # Sets of text pickle in hash order: fix it for stable fixtures.
        env = dict(os.environ, PYTHONHASHSEED='0')
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    main(sys.argv[1])
