"""Unit tests of zeotemp.zoperecover with in-process databases.

The temporary database's storage is a proxy whose MappingStorage can be
swapped for a fresh one holding only a root object: what a Zope instance
sees when zeotemp restarts (ZEO then invalidates the database's cache and
notifies StaleCache, which the tests do by hand).

Run with an e2e venv (N = 4, 5 or 6; tests/e2e/zope.sh --zope N makes it and
runs them first):
    target/e2e-venv-zopeN/bin/python -m pytest zope/zeotemp.zoperecover/tests
"""

import App.config
import pytest
import transaction
import ZODB
from OFS.Application import Application
from OFS.Folder import Folder
from ZEO.interfaces import StaleCache
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import POSKeyError
from Zope2.Startup.datatypes import DBTab
from Zope2.Startup.datatypes import ZopeDatabase

from zeotemp.zoperecover import remount
from zeotemp.zoperecover import startup

import zopedbconfig


TEMPORARY = 'Products.TemporaryFolder.TemporaryContainer'


class SwappableStorage:
    """Forwards everything to a MappingStorage that ``restart()`` replaces
    with a new one holding only a root object (newer tids)."""

    def __init__(self, name):
        self.__name__ = name
        self.inner = MappingStorage(name)

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def late_bound(*args, **kw):
            # ZODB's MVCC adapter keeps bound methods: call the current
            # storage's.
            return getattr(self.inner, name)(*args, **kw)
        return late_bound

    def restart(self):
        fresh = MappingStorage(self.__name__)
        ZODB.DB(fresh)  # stores the root object, as zeotemp has one
        # Oids of the old run must not exist in the new one (zeotemp never
        # reuses an earlier run's range); MappingStorage starts again at 1.
        fresh._oid = self.inner._oid + 1000
        self.inner = fresh


class Factory:
    def __init__(self, storage):
        self.storage = storage

    def open(self):
        return self.storage


class DBConfig(zopedbconfig.DBConfig):
    def __init__(self, name, mount_points, storage, container_class=None):
        super().__init__(name, mount_points, Factory(storage),
                         container_class)


@pytest.fixture
def zope():
    """A main database (with an Application) and a temporary database
    configured at /temp_folder, as zope.conf's stanza does."""
    original = App.config.getConfiguration()
    temp_storage = SwappableStorage('temporary')
    factories = {
        'main': ZopeDatabase(DBConfig('main', ['/'],
                                      MappingStorage('main'))),
        'temporary': ZopeDatabase(DBConfig('temporary', ['/temp_folder'],
                                           temp_storage, TEMPORARY)),
    }
    dbtab = DBTab(factories, {'/': 'main', '/temp_folder': 'temporary'})
    config = App.config.DefaultConfiguration()
    config.dbtab = dbtab
    App.config.setConfiguration(config)
    db = dbtab.getDatabase('/')
    dbtab.getDatabase('/temp_folder')
    conn = db.open()
    conn.root()['Application'] = Application()
    transaction.commit()
    conn.close()

    class Env:
        pass

    env = Env()
    env.db, env.dbtab, env.temp_storage = db, dbtab, temp_storage
    env.temp_db = dbtab.getDatabase('/temp_folder')
    yield env
    transaction.abort()
    remount.uninstall()
    App.config.setConfiguration(original)
    for d in list(dbtab.databases.values()):
        d.close()


def open_app(env):
    conn = env.db.open()
    return conn, conn.root()['Application']


def restart_temp(env, notify=True):
    """What a zeotemp restart does to a connected Zope instance."""
    env.temp_storage.restart()
    if notify:
        remount.stale_cache(StaleCache(env.temp_db.storage))
    # ClientStorage calls this on the MVCC adapter it was registered with.
    env.temp_db._mvcc_storage.invalidateCache()


def test_startup_creates_the_temporary_mount_point_once(zope):
    assert startup.temporary_mount_paths(zope.dbtab) == ['/temp_folder']
    assert startup.ensure_temporary_mounts(zope.db, zope.dbtab) == [
        '/temp_folder']
    assert startup.ensure_temporary_mounts(zope.db, zope.dbtab) == []
    conn, app = open_app(zope)
    assert app.temp_folder.meta_type == 'Temporary Folder'
    assert app.temp_folder._p_jar.db() is zope.temp_db
    conn.close()


def test_database_opened_subscriber(zope):
    class Event:
        database = zope.db
    startup.database_opened(Event())
    assert remount._original is not None  # the re-mount check is installed
    conn, app = open_app(zope)
    assert 'temp_folder' in app.objectIds()
    conn.close()


def add_folder(container, id):
    container._setObject(id, Folder(id))


def mount_and_write(zope):
    startup.ensure_temporary_mounts(zope.db, zope.dbtab)
    conn, app = open_app(zope)
    add_folder(app.temp_folder, 'before_restart')
    transaction.commit()
    assert 'before_restart' in app.temp_folder.objectIds()
    return conn, app


def test_stock_zope_keeps_the_old_temp_folder(zope):
    """Without the add-on: POSKeyError on every use after the restart."""
    conn, app = mount_and_write(zope)
    restart_temp(zope)
    for _ in range(3):
        transaction.begin()
        with pytest.raises(POSKeyError):
            app.temp_folder.objectIds()
        transaction.abort()
    conn.close()


@pytest.mark.parametrize('notify', [True, False],
                         ids=['stale-cache-event', 'poskeyerror-fallback'])
def test_remounts_after_restart(zope, notify):
    remount.install()
    conn, app = mount_and_write(zope)
    old = app.temp_folder.aq_base
    restart_temp(zope, notify=notify)
    transaction.begin()
    tf = app.temp_folder
    assert tf.aq_base is not old
    assert tf.meta_type == 'Temporary Folder'   # created again
    assert tf.objectIds() == []                 # the old content is gone
    add_folder(tf, 'after_restart')
    transaction.commit()
    # Another connection (another request thread) sees the same new folder.
    conn2, app2 = open_app(zope)
    assert app2.temp_folder.objectIds() == ['after_restart']
    conn2.close()
    # and the first one keeps its new mount until the next restart
    transaction.begin()
    assert app.temp_folder.aq_base is tf.aq_base
    transaction.abort()
    conn.close()


def test_remounts_an_object_of_an_aborted_transaction(zope):
    """An instance that created temp_folder in a transaction that was then
    aborted (a ConflictError with another instance doing the same) must not
    keep using that connection-less object."""
    from Products.TemporaryFolder import TemporaryContainer
    remount.install()
    conn, app = mount_and_write(zope)
    mount_point = app.__dict__['temp_folder']
    mount_point._v_data = (TemporaryContainer('temp_folder'),)
    assert app.temp_folder._p_jar is not None
    assert 'before_restart' in app.temp_folder.objectIds()
    conn.close()


def test_no_remount_without_a_reason(zope):
    remount.install()
    conn, app = mount_and_write(zope)
    first = app.temp_folder.aq_base
    transaction.begin()
    assert app.temp_folder.aq_base is first
    # A StaleCache of another storage does not concern this mount point.
    remount.stale_cache(StaleCache(zope.db.storage))
    transaction.begin()
    assert app.temp_folder.aq_base is first
    transaction.abort()
    conn.close()
