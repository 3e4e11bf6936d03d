"""The ZEO client that the Zope add-on zeotemp.zoperecover opens from a
``<product-config zeotemp>`` section, against a real server: over TCP
(``server-sync``, ``name``, ``storage``), a unix socket, and TLS with a
client certificate (``ssl-*`` keys).

Only the add-on's ``productconfig`` module is used (it needs ZEO and
ZConfig, not Zope); its parsing and its registration in Zope are unit
tested in zope/zeotemp.zoperecover/tests, the whole Zope path by
tests/e2e/cookiecutter.sh.
"""

import pathlib
import sys

import pytest
import transaction
import ZODB

from test_tls import SERVER_NAME, certs, commit_and_read_back  # noqa: F401
from test_tls import tls_server  # noqa: F401 (fixtures)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]
                       / "zope" / "zeotemp.zoperecover" / "src"))

from zeotemp.zoperecover import productconfig  # noqa: E402

pytestmark = pytest.mark.zeotemp_only(
    reason="the add-on is for zeotemp; TLS without client certificates")


def address(srv):
    a = srv.address
    return a if isinstance(a, str) else f"{a[0]}:{a[1]}"


@pytest.fixture
def open_db():
    dbs = []

    def open_(mapping):
        settings = productconfig.parse(mapping)
        storage = productconfig.ClientStorageFactory(settings).open()
        db = ZODB.DB(storage)
        dbs.append(db)
        return db, storage
    yield open_
    for db in dbs:
        db.close()


def test_tcp_with_the_defaults(server_factory, open_db):
    srv = server_factory(storages=("1", "sessions"))
    db, storage = open_db({"address": address(srv), "storage": "sessions",
                           "client-label": "zope-a"})
    assert storage.server_sync is True   # the product-config default
    assert storage.__name__ == "temporary"   # the database name
    commit_and_read_back(db, "k", "over TCP")
    # another client of the same storage, as another Zope instance, reads
    # it at once (server-sync)
    db2, _ = open_db({"address": address(srv), "storage": "sessions"})
    tm = transaction.TransactionManager()
    conn = db2.open(transaction_manager=tm)
    assert conn.root()["k"] == "over TCP"
    conn.close()


def test_unix_socket(server_factory, open_db, tmp_path):
    path = tmp_path / "zeotemp.sock"
    server_factory(unix_socket=path)
    db, _ = open_db({"address": str(path), "name": "tmp-client"})
    commit_and_read_back(db, "k", "over a unix socket")


def test_tls_with_a_client_certificate(tls_server, certs, open_db):  # noqa: F811
    srv = tls_server(client_ca=True)
    db, storage = open_db({
        "address": address(srv),
        "ssl-authenticate": certs.cert("ca"),
        "ssl-certificate": certs.cert("client"),
        "ssl-key": certs.key("client"),
        "ssl-server-hostname": SERVER_NAME,
    })
    commit_and_read_back(db, "k", "over TLS")


def test_tls_refused_without_the_client_certificate(tls_server, certs):  # noqa: F811
    srv = tls_server(client_ca=True)
    settings = productconfig.parse({
        "address": address(srv), "wait-timeout": "2",
        "ssl-authenticate": certs.cert("ca"),
        "ssl-server-hostname": SERVER_NAME})
    with pytest.raises(Exception):
        productconfig.ClientStorageFactory(settings).open()
