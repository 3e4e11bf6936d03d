"""The zope.conf stanzas in config/ that mount zeotemp at /temp_folder,
loaded whole with ZConfig (the way Zope reads zope.conf) and opened against
the test server."""

import io
import pathlib
import re

import pytest
import transaction
import ZConfig
import ZODB

from zeotemp_util import ZOPE_SCHEMA as SCHEMA

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "config"



def load_stanza(filename, port):
    text = (CONFIG_DIR / filename).read_text()
    # The files name the default port; the test server has its own.
    assert "server 127.0.0.1:8101" in text
    text = text.replace("127.0.0.1:8101", f"127.0.0.1:{port}")
    schema = ZConfig.loadSchemaFile(io.StringIO(SCHEMA))
    conf, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
    (db_conf,) = conf.databases  # ZODB.config.ZODBDatabase
    section = db_conf.config
    assert section.getSectionName() == "temporary"
    assert section.mount_points == ["/temp_folder"]
    assert section.container_class == "Products.TemporaryFolder.TemporaryContainer"
    return section, text


@pytest.mark.parametrize("filename", ["zope-temp-clientstorage.conf", "zope-temp-zeoclient.conf"])
def test_zope_conf_stanza(server, make_db, filename):
    host, port = server.address
    section, text = load_stanza(filename, port)
    storage = section.storage.open()
    db = ZODB.DB(storage)
    try:
        assert storage.getName().split(" (")[0] == "temporary"
        assert storage.server_sync is bool(re.search(r"^\s*server-sync on", text, re.M))
        tm = transaction.TransactionManager()
        conn = db.open(transaction_manager=tm)
        conn.root()["session"] = {"user": "alice"}
        tm.commit()
        tm.begin()
        assert conn.root()["session"] == {"user": "alice"}
        conn.close()
    finally:
        db.close()
    other = make_db(server).open(transaction_manager=transaction.TransactionManager())
    other.transaction_manager.begin()
    assert other.root()["session"] == {"user": "alice"}
    other.close()


def test_clientstorage_stanza_uses_server_sync():
    # The README promises cross-instance reads through server-sync.
    _, text = load_stanza("zope-temp-clientstorage.conf", 8101)
    assert re.search(r"^\s*server-sync on", text, re.M)
