"""What fills a storage: objects and bytes by class (zeotemp only).

A stock client stores objects of known classes (PersistentMapping,
OOBTree, the test class ``zeotemp_testobjects.Item``); ``server_status()``
must list each class under its ``module.name`` with exactly the objects
the client created (the root mapping adds one) and the bytes of their
current records, read back with ``load``; the metrics
(``zeotemp_class_objects`` / ``zeotemp_class_bytes``) must say the same.
When the client unlinks them and the storage is packed (which collects
garbage at once), their counts drop. ``--class-table-size`` bounds the
listing: the N biggest classes by bytes, the rest as ``(other)``, and 0
lists none.
"""

import pytest
import transaction
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping

from test_monitoring import METRICS, metrics_url, scrape
from zeotemp_testobjects import Item

PM = "persistent.mapping.PersistentMapping"
TREE = "BTrees.OOBTree.OOBTree"
ITEM = f"{Item.__module__}.{Item.__name__}"


def class_name(obj):
    return f"{type(obj).__module__}.{type(obj).__name__}"


def store_known_classes(db, maps=6, trees=4, items=30):
    """Commits ``maps`` PersistentMappings, ``trees`` small OOBTrees (one
    object each: a single bucket is kept inline) and ``items`` Items under
    the root; returns {class: [oid, ...]} of what was created, root
    included."""
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    root = conn.root()
    root["maps"] = [PersistentMapping({"n": i}) for i in range(maps)]
    trees_ = []
    for i in range(trees):
        t = OOBTree()
        for k in range(3):
            t[f"key{k}"] = i * k
        trees_.append(t)
    root["trees"] = trees_
    # Bigger records, so that this class holds the most bytes.
    root["items"] = [Item("x" * 300 + str(i)) for i in range(items)]
    tm.commit()
    created = {}
    for obj in [root] + root["maps"] + root["trees"] + root["items"]:
        created.setdefault(class_name(obj), []).append(obj._p_oid)
    conn.close()
    return created


def unlink(db, *keys):
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    tm.begin()
    for key in keys:
        del conn.root()[key]
    tm.commit()
    conn.close()


def expected_rows(cs, created):
    """{class: (objects, bytes)}: the bytes of each object's current record
    as the client loads it."""
    return {cls: (len(oids), sum(len(cs.load(oid)[0]) for oid in oids))
            for cls, oids in created.items()}


def classes_of(status):
    return {row["class"]: (row["objects"], row["bytes"])
            for row in status["classes"]}


def classes_in_metrics(families, storage="1"):
    got = {}
    for name, field in (("zeotemp_class_objects", 0),
                        ("zeotemp_class_bytes", 1)):
        for labels, value in families[name].items():
            labels = dict(labels)
            if labels["storage"] == storage:
                got.setdefault(labels["class"], [0, 0])[field] = int(value)
    return {cls: tuple(v) for cls, v in got.items()}


@pytest.mark.zeotemp_only(reason="the class table is zeotemp's")
def test_status_and_metrics_name_the_classes_stored(server_factory, make_db,
                                                    make_storage):
    srv = server_factory(zeotemp_args=METRICS)
    url = metrics_url(srv)
    db = make_db(srv)
    monitor = make_storage(srv)
    created = store_known_classes(db, maps=6, trees=4, items=30)
    assert {cls: len(oids) for cls, oids in created.items()} == {
        PM: 7, TREE: 4, ITEM: 30}

    status = monitor.server_status()
    want = expected_rows(monitor, created)
    assert classes_of(status) == want, status["classes"]
    # Biggest first; they add up to the storage's size and objects.
    sizes = [row["bytes"] for row in status["classes"]]
    assert sizes == sorted(sizes, reverse=True)
    assert status["classes"][0]["class"] == ITEM
    assert sum(sizes) == status["size"]
    assert sum(r["objects"] for r in status["classes"]) == status["objects"]
    assert classes_in_metrics(scrape(url)) == want

    # Unlinked and packed: the Items and the trees are freed.
    freed_before = status["freed-objects"]
    unlink(db, "items", "trees")
    db.pack()
    status = monitor.server_status()
    assert status["freed-objects"] == freed_before + 34, status
    del created[ITEM], created[TREE]
    want = expected_rows(monitor, created)
    assert classes_of(status) == want == {PM: want[PM]}
    assert want[PM][0] == 7
    assert classes_in_metrics(scrape(url)) == want


@pytest.mark.zeotemp_only(reason="the class table is zeotemp's")
def test_class_table_size_bounds_the_listing(server_factory, make_db,
                                             make_storage):
    srv = server_factory(zeotemp_args=METRICS + ("--class-table-size", "1"))
    url = metrics_url(srv)
    db = make_db(srv)
    monitor = make_storage(srv)
    created = store_known_classes(db, maps=3, trees=2, items=10)
    want = expected_rows(monitor, created)
    rest = [want[PM], want[TREE]]
    other = (sum(r[0] for r in rest), sum(r[1] for r in rest))
    listed = {ITEM: want[ITEM], "(other)": other}
    status = monitor.server_status()
    assert classes_of(status) == listed
    assert [r["class"] for r in status["classes"]] == [ITEM, "(other)"]
    assert classes_in_metrics(scrape(url)) == listed

    off = server_factory(zeotemp_args=METRICS + ("--class-table-size", "0"))
    store_known_classes(make_db(off))
    status = make_storage(off).server_status()
    assert "classes" not in status and status["objects"] == 1 + 6 + 4 + 30
    families = scrape(metrics_url(off))
    assert families["zeotemp_class_objects"] == {}
    assert families["zeotemp_class_bytes"] == {}
