"""Unit tests of the temporary database from ``<product-config zeotemp>``
(zeotemp.zoperecover.productconfig): parsing, registration in Zope's
database table, the ZCML directive, and the README's key table.

The storage is a MappingStorage in place of the ZEO client (no server);
tests/e2e/cookiecutter.sh runs the real thing.

Run with the e2e venv:  target/e2e-venv-zope6/bin/python -m pytest zope/zeotemp.zoperecover/tests
"""

import os
import re

import App.config
import pytest
import transaction
from OFS.Application import Application
from ZODB.MappingStorage import MappingStorage
from Zope2.Startup.datatypes import DBTab
from Zope2.Startup.datatypes import ZopeDatabase

from zeotemp.zoperecover import productconfig
from zeotemp.zoperecover import remount
from zeotemp.zoperecover import startup
from zeotemp.zoperecover.productconfig import ProductConfigError
from zeotemp.zoperecover.productconfig import parse

import zopedbconfig


README = os.path.join(os.path.dirname(__file__), '..', 'README.md')


# -- parsing -----------------------------------------------------------------

def test_defaults():
    s = parse({'address': '127.0.0.1:8101'})
    assert s.address == ('127.0.0.1', 8101)
    assert s.storage == '1'
    assert s.name == 'temporary'            # the database name
    assert s.server_sync is True            # unlike <clientstorage>'s off
    assert s.cache_size == 20 * 1024 * 1024
    assert s.read_only is False and s.read_only_fallback is False
    assert s.wait_timeout == 30
    assert s.client_label is None
    assert s.mount_point == '/temp_folder'
    assert s.database_name == 'temporary'
    assert s.db_cache_size == 5000 and s.db_pool_size == 7
    assert s.tls is False
    assert s.describe() == 'ZEO server 127.0.0.1:8101, storage 1'


def test_values_are_converted_as_zope_conf_would():
    s = parse({'address': '/run/zeotemp/zeotemp.sock', 'storage': 'sessions',
               'name': 'tmp-client', 'server-sync': 'off',
               'cache-size': '64MB', 'read-only-fallback': 'true',
               'wait-timeout': '5', 'client-label': 'zope-a',
               'mount-point': '/sessions/temp', 'database-name': 'tmp',
               'db-cache-size': '10000', 'db-pool-size': '12'})
    assert s.address == '/run/zeotemp/zeotemp.sock'
    assert (s.storage, s.name, s.server_sync) == ('sessions', 'tmp-client',
                                                  False)
    assert s.cache_size == 64 * 1024 * 1024
    assert s.read_only_fallback is True
    assert (s.wait_timeout, s.client_label) == (5, 'zope-a')
    assert (s.mount_point, s.database_name) == ('/sessions/temp', 'tmp')
    assert (s.db_cache_size, s.db_pool_size) == (10000, 12)


def test_cookiecutter_yaml_values():
    """cookiecutter renders YAML scalars with str(): `storage: 1` is 1,
    `server-sync: on` is True (YAML 1.1), and ZConfig lowercases keys."""
    s = parse({'ADDRESS': '[::1]:8101', 'storage': 1, 'server-sync': True,
               'wait-timeout': 10})
    assert s.address == ('::1', 8101)
    assert (s.storage, s.server_sync, s.wait_timeout) == ('1', True, 10)


def error(mapping):
    with pytest.raises(ProductConfigError) as e:
        parse(mapping)
    return str(e.value)


def test_unknown_keys_are_named():
    msg = error({'address': '127.0.0.1:8101', 'adress': 'x', 'wait': 'on'})
    assert msg.startswith('<product-config zeotemp>: ')
    assert "unknown keys 'adress', 'wait' (known keys: address, " in msg
    assert msg.count('(known keys') == 1
    assert "unknown key 'typo' (" in error({'address': '127.0.0.1:8101',
                                            'typo': '1'})


def test_address_is_required():
    assert "'address' is required" in error({})
    assert "'address' is required" in error({'storage': '1'})


@pytest.mark.parametrize('key,value', [
    ('address', 'localhost'),
    ('address', 'localhost:http'),
    ('address', 'localhost:'),
    ('server-sync', 'maybe'),
    ('cache-size', 'lots'),
    ('wait-timeout', '0'),
    ('wait-timeout', 'soon'),
    ('db-pool-size', '-1'),
    ('storage', 'two words'),
    ('mount-point', 'temp_folder'),
    ('mount-point', '/'),
    ('mount-point', '/temp_folder/'),
    ('mount-point', '/a/../b'),
    ('mount-point', '/virtual:/real'),
    ('database-name', 'my db'),
    ('ssl-certificate', '/nonexistent/zeotemp/client.pem'),
])
def test_bad_values_are_named(key, value):
    mapping = {'address': '127.0.0.1:8101', key: value}
    msg = error(mapping)
    assert f'bad value for {key!r}: {value!r}' in msg, msg


def test_all_problems_at_once():
    msg = error({'server-sync': 'maybe', 'typo': '1'})
    assert "unknown key 'typo'" in msg
    assert "bad value for 'server-sync'" in msg
    assert "'address' is required" in msg


def test_inconsistent_combinations():
    assert 'at most one of them' in error({
        'address': '127.0.0.1:8101', 'read-only': 'on',
        'read-only-fallback': 'on'})
    assert "'ssl-key' needs 'ssl-certificate'" in error({
        'address': '127.0.0.1:8101', 'ssl-key': __file__})


def test_not_a_product_config_mapping():
    assert 'plain product-config section' in error(object())


def test_client_storage_arguments():
    s = parse({'address': '127.0.0.1:8101', 'client-label': 'zope-a',
               'cache-size': '1MB', 'read-only': 'on'})
    kw = productconfig.ClientStorageFactory(s).client_storage_arguments()
    assert kw == dict(storage='1', cache_size=1024 * 1024, name='temporary',
                      read_only=True, read_only_fallback=False,
                      server_sync=True, wait_timeout=30,
                      client_label='zope-a')


def test_tls_arguments(tmp_path):
    import ssl
    ca = tmp_path  # a CA directory (capath), read only when connecting
    s = parse({'address': 'zeotemp.internal:8101',
               'ssl-authenticate': str(ca),
               'ssl-server-hostname': 'zeotemp.example'})
    assert s.tls is True
    assert s.describe().endswith('(TLS), storage 1')
    kw = productconfig.ClientStorageFactory(s).client_storage_arguments()
    assert isinstance(kw['ssl'], ssl.SSLContext)
    assert kw['ssl'].verify_mode == ssl.CERT_REQUIRED
    assert kw['ssl'].check_hostname is True
    assert kw['ssl_server_hostname'] == 'zeotemp.example'
    off = parse({'address': 'zeotemp.internal:8101',
                 'ssl-authenticate': str(ca), 'ssl-check-hostname': 'off'})
    kw = productconfig.ClientStorageFactory(off).client_storage_arguments()
    assert kw['ssl'].check_hostname is False


# -- registration --------------------------------------------------------------

class MappingFactory:
    """Stands for ClientStorageFactory: a MappingStorage, no server."""

    def __init__(self, settings=None):
        self.storage = MappingStorage('temporary')

    def open(self):
        return self.storage


class Section(zopedbconfig.DBConfig):
    def __init__(self, name, mount_points, container_class=None):
        super().__init__(name, mount_points, MappingFactory(),
                         container_class)


def make_dbtab(temporary=None):
    """The table zope.conf gives: main at /, and a hand-written
    <zodb_db NAME> at PATH when ``temporary`` is (NAME, PATH)."""
    factories = {'main': ZopeDatabase(Section('main', ['/']))}
    paths = {'/': 'main'}
    if temporary:
        name, path = temporary
        factories[name] = ZopeDatabase(Section(
            name, [path], productconfig.TEMPORARY_CONTAINER))
        paths[path] = name
    return DBTab(factories, paths)


class Configuration:
    def __init__(self, dbtab, product_config):
        self.dbtab = dbtab
        self.product_config = product_config


def close_all(dbtab):
    transaction.abort()
    for db in list(dbtab.databases.values()):
        db.close()


def test_register_like_a_zodb_db_section():
    dbtab = make_dbtab()
    s = parse({'address': '127.0.0.1:8101'})
    factory = productconfig.register(dbtab, s, MappingFactory())
    assert isinstance(factory, ZopeDatabase)
    assert dbtab.listMountPaths() == [('/', 'main'),
                                      ('/temp_folder', 'temporary')]
    assert dbtab.getDatabaseFactory('/temp_folder') is factory
    assert factory.getName() == 'temporary'
    assert factory.getMountParams('/temp_folder') == (
        None, '/temp_folder', 'Products.TemporaryFolder.TemporaryContainer')
    assert startup.temporary_mount_paths(dbtab) == ['/temp_folder']
    db = dbtab.getDatabase('/temp_folder')
    try:
        assert db.database_name == 'temporary'
        assert db.getCacheSize() == 5000 and db.getPoolSize() == 7
    finally:
        close_all(dbtab)


def hand_written_database(text):
    """The database a hand-written zope.conf section opens, parsed with the
    installed Zope's own schema."""
    import io
    import ZConfig
    import Zope2.Startup
    schema = ZConfig.loadSchema(os.path.join(
        os.path.dirname(Zope2.Startup.__file__), 'wsgischema.xml'))
    conf, _ = ZConfig.loadConfigFile(schema, io.StringIO(
        'instancehome %s\n%s' % (os.getcwd(), text)))
    return conf.databases[0].open('temporary', {})


def test_the_database_is_what_a_hand_written_section_gives():
    # The class factory (simpleClassFactory on Zope 4 and 5, ClassFactory
    # on 6: the product-config database failed to open on Zope 5 when it
    # was built from ZODB's schema alone), the connection class and the
    # database's other settings are this Zope's own defaults.
    hand = hand_written_database(
        '<zodb_db temporary>\n  <mappingstorage/>\n'
        '  mount-point /temp_folder\n'
        '  container-class Products.TemporaryFolder.TemporaryContainer\n'
        '</zodb_db>\n')
    dbtab = make_dbtab()
    productconfig.register(dbtab, parse({'address': '127.0.0.1:8101'}),
                           MappingFactory())
    db = dbtab.getDatabase('/temp_folder')
    try:
        assert db.classFactory is hand.classFactory
        assert db.klass is hand.klass
        for attr in ('getCacheSize', 'getPoolSize', 'getHistoricalPoolSize',
                     'getHistoricalCacheSize', 'getCacheSizeBytes'):
            assert getattr(db, attr)() == getattr(hand, attr)(), attr
        assert db.large_record_size == hand.large_record_size
    finally:
        hand.close()
        close_all(dbtab)


def test_db_keys_reach_the_database():
    dbtab = make_dbtab()
    s = parse({'address': '127.0.0.1:8101', 'database-name': 'tmp',
               'mount-point': '/tmp_sessions', 'db-cache-size': '123',
               'db-pool-size': '3'})
    productconfig.register(dbtab, s, MappingFactory())
    db = dbtab.getDatabase('/tmp_sessions')
    try:
        assert db.database_name == 'tmp'
        assert db.getCacheSize() == 123 and db.getPoolSize() == 3
    finally:
        close_all(dbtab)


def test_the_same_settings_twice_is_one_database():
    dbtab = make_dbtab()
    s = parse({'address': '127.0.0.1:8101'})
    first = productconfig.register(dbtab, s, MappingFactory())
    again = productconfig.register(dbtab, parse({'address': '127.0.0.1:8101'}),
                                   MappingFactory())
    assert again is first
    with pytest.raises(ProductConfigError, match='different'):
        productconfig.register(dbtab, parse({'address': '127.0.0.1:8102'}))


def test_a_hand_written_section_for_the_same_path_is_an_error():
    dbtab = make_dbtab(('temporary', '/temp_folder'))
    with pytest.raises(ProductConfigError) as e:
        productconfig.register(dbtab, parse({'address': '127.0.0.1:8101'}))
    assert ('zope.conf has a <zodb_db temporary> section for /temp_folder '
            'too') in str(e.value)
    # nothing changed
    assert dbtab.mount_paths == {'/': 'main', '/temp_folder': 'temporary'}
    assert not hasattr(dbtab.db_factories['temporary'], 'zeotemp_settings')


def test_a_database_name_zope_conf_has_is_an_error():
    dbtab = make_dbtab(('temporary', '/other_temp'))
    with pytest.raises(ProductConfigError,
                       match="already has a database named 'temporary'"):
        productconfig.register(dbtab, parse({'address': '127.0.0.1:8101'}))
    # zope.conf's names are lower case (ZConfig lowers section names): the
    # same name in other letters is the same database
    with pytest.raises(ProductConfigError,
                       match="already has a database named 'temporary'"):
        productconfig.register(dbtab, parse({'address': '127.0.0.1:8101',
                                             'database-name': 'Temporary'}))
    # another name and path is fine next to it
    productconfig.register(dbtab, parse({'address': '127.0.0.1:8101',
                                         'database-name': 'zeotemp'}),
                           MappingFactory())
    assert dbtab.mount_paths['/temp_folder'] == 'zeotemp'


def test_configure_opens_the_database_and_logs(caplog):
    dbtab = make_dbtab()
    conf = Configuration(dbtab, {'zeotemp': {'address': '127.0.0.1:8101'}})
    caplog.set_level('INFO', 'zeotemp.zoperecover')
    factory = productconfig.configure(conf, MappingFactory())
    try:
        assert 'temporary' in dbtab.databases   # opened
        assert dbtab.getDatabaseFactory('/temp_folder') is factory
        assert ("temporary database 'temporary' at /temp_folder from "
                '<product-config zeotemp>: ZEO server 127.0.0.1:8101, '
                'storage 1') in caplog.text
        # again (ZCML loaded twice): the same, not opened twice
        assert productconfig.configure(conf, MappingFactory()) is factory
    finally:
        close_all(dbtab)


def test_configure_without_the_section_does_nothing():
    dbtab = make_dbtab()
    assert productconfig.configure(Configuration(dbtab, {})) is None
    assert productconfig.configure(Configuration(dbtab, None)) is None
    assert productconfig.configure(
        Configuration(dbtab, {'other': {'address': 'x'}})) is None
    assert dbtab.listMountPaths() == [('/', 'main')]


def test_configure_errors_are_logged(caplog):
    conf = Configuration(make_dbtab(), {'zeotemp': {'adress': 'x'}})
    with pytest.raises(ProductConfigError):
        productconfig.configure(conf)
    assert "unknown key 'adress'" in caplog.text
    assert 'ERROR' in caplog.text
    conf = Configuration(None, {'zeotemp': {'address': '127.0.0.1:8101'}})
    with pytest.raises(ProductConfigError, match='no database table'):
        productconfig.configure(conf)


def test_configure_reports_an_unreachable_server(caplog):
    """A real ClientStorage to a port nothing listens on: Zope's startup
    stops after wait-timeout, with the reason in the log."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    conf = Configuration(make_dbtab(), {'zeotemp': {
        'address': f'127.0.0.1:{port}', 'wait-timeout': '1'}})
    with pytest.raises(Exception):
        productconfig.configure(conf)
    assert (f"could not open the temporary database 'temporary' of "
            f'<product-config zeotemp> (ZEO server 127.0.0.1:{port}, '
            f'storage 1, wait-timeout 1 s)') in caplog.text


# -- the ZCML, and then Zope's startup subscriber ---------------------------------

@pytest.fixture
def zope_configuration():
    original = App.config.getConfiguration()
    dbtab = make_dbtab()
    config = App.config.DefaultConfiguration()
    config.dbtab = dbtab
    config.product_config = {'zeotemp': {'address': '127.0.0.1:8101'}}
    App.config.setConfiguration(config)
    main = dbtab.getDatabase('/')
    conn = main.open()
    conn.root()['Application'] = Application()
    transaction.commit()
    conn.close()
    yield config
    remount.uninstall()
    App.config.setConfiguration(original)
    close_all(dbtab)


def load_zcml():
    from zope.configuration import xmlconfig
    xmlconfig.string('''
        <configure xmlns="http://namespaces.zope.org/zope">
          <include package="zope.component" file="meta.zcml" />
          <include package="zeotemp.zoperecover" />
        </configure>''')


def test_zcml_registers_then_startup_mounts(zope_configuration, monkeypatch):
    monkeypatch.setattr(productconfig, 'ClientStorageFactory',
                        MappingFactory)
    dbtab = zope_configuration.dbtab
    load_zcml()
    assert dbtab.mount_paths['/temp_folder'] == 'temporary'
    assert 'temporary' in dbtab.databases

    class Event:
        database = dbtab.getDatabase('/')
    startup.database_opened(Event())   # IDatabaseOpenedWithRoot
    conn = Event.database.open()
    try:
        app = conn.root()['Application']
        assert app.temp_folder.meta_type == 'Temporary Folder'
        assert (app.temp_folder._p_jar.db()
                is dbtab.getDatabase('/temp_folder'))
    finally:
        transaction.abort()
        conn.close()


def test_zcml_included_twice(zope_configuration, monkeypatch):
    """site.zcml's include and Plone's autoinclude of the same file: one
    registration, no ZCML conflict."""
    from zope.configuration import xmlconfig
    monkeypatch.setattr(productconfig, 'ClientStorageFactory',
                        MappingFactory)
    xmlconfig.string('''
        <configure xmlns="http://namespaces.zope.org/zope">
          <include package="zope.component" file="meta.zcml" />
          <include package="zeotemp.zoperecover" />
          <include package="zeotemp.zoperecover" file="configure.zcml" />
        </configure>''')
    assert zope_configuration.dbtab.mount_paths['/temp_folder'] == 'temporary'


def test_zcml_stops_on_a_bad_section(zope_configuration):
    from zope.configuration.config import ConfigurationExecutionError
    zope_configuration.product_config = {'zeotemp': {
        'address': '127.0.0.1:8101', 'sever-sync': 'on'}}
    with pytest.raises(ConfigurationExecutionError) as e:
        load_zcml()
    assert "unknown key 'sever-sync'" in str(e.value)


def test_zcml_without_product_config_changes_nothing(zope_configuration):
    zope_configuration.product_config = {}
    load_zcml()
    assert zope_configuration.dbtab.listMountPaths() == [('/', 'main')]


# -- the README documents every key with its default -------------------------

def test_readme_documents_every_key():
    text = open(README, encoding='utf-8').read()
    rows = dict(re.findall(r'(?m)^\| `([a-z-]+)` \| ([^|]*) \|', text))
    assert sorted(rows) == sorted(productconfig.KEYS)
