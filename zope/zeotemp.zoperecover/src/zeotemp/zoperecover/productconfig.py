"""The temporary database from ``<product-config zeotemp>``, without a
hand-written ``<zodb_db>`` section.

cookiecutter-zope-instance (the generator of Plone 6 instances) has no
option for a temporary storage and no free-form ``zope.conf`` text, but it
writes ``<product-config NAME>`` sections and ZCML includes. With ::

    <product-config zeotemp>
      address 127.0.0.1:8101
    </product-config>

and the add-on's ZCML loaded, this module registers a database factory for
``/temp_folder`` in Zope's database table (``App.config.getConfiguration()
.dbtab``, ``Zope2.Startup.datatypes.DBTab``), exactly where a ``<zodb_db
temporary>`` section of ``zope.conf`` would have put it, and opens the
database. From then on nothing differs from the hand-written section:
``startup.database_opened`` creates the ``/temp_folder`` mount point
(``IDatabaseOpenedWithRoot``), ``Products.ZODBMountPoint``'s mount point
finds the database through the table by its path, and ``remount`` mounts
again after a zeotemp restart.

When: Zope's startup (``Zope2.App.startup.startup``) opens the databases of
``zope.conf``, notifies ``IDatabaseOpened``, then loads ZCML, then creates
the application object (``OFS.Application.initialize``) and notifies
``IDatabaseOpenedWithRoot``. ``IDatabaseOpened`` comes before any add-on's
ZCML is loaded, so no subscriber can hear it; the registration is the
action of a ZCML directive of the add-on's own ``configure.zcml``
(``zeotemp:temporaryDatabaseFromProductConfig``), run while Zope loads
ZCML: before the application is initialized, before any subscriber of
``IDatabaseOpenedWithRoot`` and before the first request, so before anything
can traverse ``/temp_folder``.

Errors (an unknown key, a bad value, a mount path or database name that
``zope.conf`` already configures) stop Zope's startup with a
``ProductConfigError`` naming the key, also logged to the event log: a
typo would otherwise leave the site without sessions.
"""

import io
import os
import logging
import re


LOG = logging.getLogger('zeotemp.zoperecover')

SECTION = 'zeotemp'
TEMPORARY_CONTAINER = 'Products.TemporaryFolder.TemporaryContainer'


class ProductConfigError(ValueError):
    """``<product-config zeotemp>`` cannot be used as it is."""


# -- value types: ZConfig's own datatypes, as zope.conf uses them -----------

def _stock(name):
    from ZConfig.datatypes import Registry
    return Registry().get(name)


def _boolean(value):
    return _stock('boolean')(value)


def _byte_size(value):
    return _stock('byte-size')(value)


def _positive_integer(value):
    number = _stock('integer')(value)
    if number <= 0:
        raise ValueError('must be greater than 0')
    return number


def _address(value):
    # host:port, [ipv6]:port, or the path of a unix socket (with a '/').
    if '/' not in value and ':' not in value:
        raise ValueError('no port (host:port, or a unix socket path)')
    address = _stock('socket-connection-address')(value).address
    if isinstance(address, tuple) and not address[1]:
        raise ValueError('no port (host:port, or a unix socket path)')
    return address


def _existing_file(value):
    return _stock('existing-file')(value)


def _existing_path(value):
    return _stock('existing-path')(value)


def _word(value):
    if not value or any(c.isspace() for c in value):
        raise ValueError('must be one word, without spaces')
    return value


def _dotted_name(value):
    return _stock('dotted-name')(value)


_ID = re.compile(r'^[A-Za-z0-9_.~-]+$')


def _mount_point(value):
    if not value.startswith('/') or value == '/' or value.endswith('/'):
        raise ValueError('a path like /temp_folder: starts with /, is not '
                         '/ and does not end with /')
    for part in value[1:].split('/'):
        if not _ID.match(part) or part in ('.', '..'):
            raise ValueError('%r is not a usable object id' % part)
    return value


def _database_name(value):
    if not _ID.match(value):
        raise ValueError('letters, digits, "_", ".", "-" and "~" only')
    # zope.conf's section names (<zodb_db NAME>) are lower case: ZConfig
    # lowers them, and so the factory names them; the same here, so that
    # the clash check against zope.conf's databases compares like with like.
    return value.lower()


class Key:
    """One key of ``<product-config zeotemp>``."""

    def __init__(self, name, convert, default, what):
        self.name, self.convert, self.default, self.what = (
            name, convert, default, what)


REQUIRED = object()

#: Every key, with its conversion, default and what it is (the add-on
#: README's table lists the same keys; test_productconfig checks that).
KEYS = {k.name: k for k in [
    Key('address', _address, REQUIRED,
        'zeotemp address: host:port, [ipv6]:port, or a unix socket path'),
    Key('storage', _word, '1',
        'storage name on the server (zeotemp --storage)'),
    Key('name', _word, None,
        'the ZEO client\'s name, in logs (default: the database name)'),
    Key('server-sync', _boolean, True,
        'ask the server at each transaction start, so a session written '
        'through one instance is read by the next request on another'),
    Key('cache-size', _byte_size, 20 * 1024 * 1024,
        'ZEO client cache size (bytes, KB, MB, GB)'),
    Key('read-only', _boolean, False, 'open read-only'),
    Key('read-only-fallback', _boolean, False,
        'accept a read-only server when no writable one is reachable'),
    Key('wait-timeout', _positive_integer, 30,
        'seconds to wait for zeotemp at startup and on each reconnect'),
    Key('client-label', _word, None, 'label of this client in server logs'),
    Key('mount-point', _mount_point, '/temp_folder',
        'where the temporary database is mounted'),
    Key('database-name', _database_name, 'temporary',
        'name of the database in Zope (Control Panel, multi-database)'),
    Key('db-cache-size', _positive_integer, 5000,
        'objects kept per connection (<zodb_db> cache-size)'),
    Key('db-pool-size', _positive_integer, 7,
        'connections before a warning (<zodb_db> pool-size)'),
    Key('ssl-certificate', _existing_file, None,
        'TLS: client certificate (PEM); any ssl-* key turns TLS on'),
    Key('ssl-key', _existing_file, None,
        'TLS: key of the client certificate (when not in the certificate '
        'file)'),
    Key('ssl-password-function', _dotted_name, None,
        'TLS: dotted name of a function returning the key\'s password'),
    Key('ssl-authenticate', _existing_path, None,
        'TLS: CA file or directory to verify zeotemp\'s certificate with '
        '(default: the system\'s CAs)'),
    Key('ssl-check-hostname', _boolean, True,
        'TLS: check the host name in zeotemp\'s certificate'),
    Key('ssl-server-hostname', _word, None,
        'TLS: the host name to check (default: the address\'s host)'),
]}


class Settings:
    """The converted keys, as attributes (``server_sync`` for
    ``server-sync``); comparable, so that loading the same configuration
    twice is recognised."""

    def __init__(self, values):
        self._values = dict(values)
        for name, value in values.items():
            setattr(self, name.replace('-', '_'), value)

    def __eq__(self, other):
        return (isinstance(other, Settings)
                and self._values == other._values)

    def __ne__(self, other):
        return not self == other

    __hash__ = None

    def describe(self):
        address = self.address
        if isinstance(address, tuple):
            address = '%s:%s' % address
        return 'ZEO server %s%s, storage %s' % (
            address, ' (TLS)' if self.tls else '', self.storage)


def parse(mapping):
    """``Settings`` from the ``<product-config zeotemp>`` mapping (keys
    lowercased by ZConfig, values strings); ``ProductConfigError`` naming
    every unknown key, bad value and missing key."""
    if not hasattr(mapping, 'items'):
        raise ProductConfigError(
            '<product-config %s> must be a plain product-config section '
            '(key value lines), not %r' % (SECTION, type(mapping).__name__))
    problems = []
    values = {}
    given = {str(k).lower(): v for k, v in mapping.items()}
    unknown = sorted(name for name in given if name not in KEYS)
    if unknown:
        problems.append('unknown key%s %s (known keys: %s)' % (
            's' if len(unknown) > 1 else '',
            ', '.join(repr(name) for name in unknown),
            ', '.join(sorted(KEYS))))
    for name, key in KEYS.items():
        if name not in given:
            if key.default is REQUIRED:
                problems.append('%r is required (%s)' % (name, key.what))
            values[name] = None if key.default is REQUIRED else key.default
            continue
        raw = given[name]
        raw = '' if raw is None else str(raw).strip()
        try:
            values[name] = key.convert(raw)
        except Exception as e:  # ZConfig raises ValueError, sometimes others
            problems.append('bad value for %r: %r (%s: %s)' % (
                name, raw, key.what, e))
    # TLS is on as soon as any ssl-* key is given, as a <clientstorage>
    # with an <ssl> section.
    values['tls'] = any(name.startswith('ssl-') for name in given)
    if not problems:
        if values['name'] is None:
            values['name'] = values['database-name']
        if values['read-only'] and values['read-only-fallback']:
            problems.append("'read-only' and 'read-only-fallback' are both "
                            'on: at most one of them may be')
        if values['ssl-key'] and not values['ssl-certificate']:
            problems.append("'ssl-key' needs 'ssl-certificate'")
        if (values['ssl-password-function']
                and not values['ssl-certificate']):
            problems.append("'ssl-password-function' needs "
                            "'ssl-certificate'")
    if problems:
        raise ProductConfigError(
            '<product-config %s>: %s' % (SECTION, '; '.join(problems)))
    return Settings(values)


# -- the storage and the database factory ----------------------------------

class _SSLSection:
    """The attributes ZEO's ``<ssl>`` section gives ``ZEO.zconfig``."""

    def __init__(self, settings):
        self.certificate = settings.ssl_certificate
        self.key = settings.ssl_key
        self.password_function = settings.ssl_password_function
        self.authenticate = settings.ssl_authenticate
        self.check_hostname = settings.ssl_check_hostname
        self.server_hostname = settings.ssl_server_hostname


class ClientStorageFactory:
    """Opens the ``ZEO.ClientStorage`` that a ``<clientstorage>`` section
    with the same keys would open."""

    def __init__(self, settings):
        self.settings = settings

    def client_storage_arguments(self):
        s = self.settings
        kw = dict(storage=s.storage, cache_size=s.cache_size, name=s.name,
                  read_only=s.read_only,
                  read_only_fallback=s.read_only_fallback,
                  server_sync=s.server_sync, wait_timeout=s.wait_timeout)
        if s.client_label is not None:
            kw['client_label'] = s.client_label
        if s.tls:
            from ZEO.zconfig import client_ssl
            kw['ssl'], kw['ssl_server_hostname'] = client_ssl(
                _SSLSection(s))
        return kw

    def open(self):
        from ZEO.ClientStorage import ClientStorage
        return ClientStorage([self.settings.address],
                             **self.client_storage_arguments())


def _zope_zodb_db(settings):
    """The factory Zope's own schema (``Zope2/Startup/wsgischema.xml``)
    makes of a hand-written ``<zodb_db>`` section with these settings, so
    that every attribute the installed Zope and ZODB read has the default a
    ``zope.conf`` section would give it (``class-factory`` differs between
    Zope 4/5 and 6, for one); its storage is replaced by ours. The values
    put into the text were checked by ``parse``."""
    import ZConfig
    import Zope2.Startup
    schema = ZConfig.loadSchema(os.path.join(
        os.path.dirname(Zope2.Startup.__file__), 'wsgischema.xml'))
    text = ('instancehome %s\n'
            '<zodb_db %s>\n  <mappingstorage/>\n  mount-point %s\n'
            '  container-class %s\n  cache-size %d\n  pool-size %d\n'
            '</zodb_db>\n' % (
                os.path.dirname(Zope2.Startup.__file__),
                settings.database_name, settings.mount_point,
                TEMPORARY_CONTAINER, settings.db_cache_size,
                settings.db_pool_size))
    conf, _ = ZConfig.loadConfigFile(schema, io.StringIO(text))
    return conf.databases[0]


def database_factory(settings, storage_factory=None):
    """A ``Zope2.Startup.datatypes.ZopeDatabase``, the factory type of
    ``zope.conf``'s ``<zodb_db>`` sections, for the temporary database."""
    factory = _zope_zodb_db(settings)
    factory.config.storage = storage_factory or ClientStorageFactory(settings)
    factory.zeotemp_settings = settings
    return factory


# -- registration in Zope's database table ---------------------------------

def register(dbtab, settings, storage_factory=None):
    """Add the temporary database to ``dbtab`` (not opened); return its
    factory. Registering the same settings again returns the factory
    already there; a mount path or database name that ``zope.conf``
    configures is a ``ProductConfigError``: which one would be meant is not
    for the add-on to guess."""
    path, name = settings.mount_point, settings.database_name
    existing = dbtab.mount_paths.get(path)
    if existing is not None:
        factory = dbtab.db_factories.get(existing)
        if getattr(factory, 'zeotemp_settings', None) == settings:
            return factory
        if getattr(factory, 'zeotemp_settings', None) is not None:
            raise ProductConfigError(
                '<product-config %s>: %s is already mounted from a '
                'different <product-config %s> (loaded twice with other '
                'values?)' % (SECTION, path, SECTION))
        raise ProductConfigError(
            '<product-config %s> mounts %s, and zope.conf has a <zodb_db '
            '%s> section for %s too: remove that section (or the '
            '<product-config %s>), or set mount-point to another path'
            % (SECTION, path, existing, path, SECTION))
    if name in dbtab.db_factories:
        raise ProductConfigError(
            '<product-config %s>: zope.conf already has a database named %r '
            '(<zodb_db %s>): set database-name to another name'
            % (SECTION, name, name))
    factory = database_factory(settings, storage_factory)
    dbtab.db_factories[name] = factory
    dbtab.mount_paths[path] = name
    return factory


def open_database(dbtab, settings):
    """Open the database and one connection, as Zope's startup does for the
    databases of ``zope.conf``: a zeotemp that is not reachable within
    ``wait-timeout`` stops the startup here rather than at the first
    session."""
    db = dbtab.getDatabase(settings.mount_point)
    conn = db.open()
    conn.close()
    return db


def configure(configuration=None, storage_factory=None):
    """Register and open the temporary database of ``<product-config
    zeotemp>``, if there is one; return its factory, or None."""
    if configuration is None:
        from App.config import getConfiguration
        configuration = getConfiguration()
    product_config = getattr(configuration, 'product_config', None) or {}
    mapping = product_config.get(SECTION)
    if mapping is None:
        return None
    try:
        settings = parse(mapping)
        dbtab = getattr(configuration, 'dbtab', None)
        if dbtab is None:
            raise ProductConfigError(
                '<product-config %s>: Zope has no database table (dbtab) '
                'to register the temporary database in' % SECTION)
        factory = register(dbtab, settings, storage_factory)
    except ProductConfigError as e:
        LOG.error('%s', e)
        raise
    except Exception:
        LOG.exception('<product-config %s>: could not register the '
                      'temporary database', SECTION)
        raise
    if settings.database_name in getattr(dbtab, 'databases', {}):
        return factory  # opened already (ZCML loaded again)
    try:
        open_database(dbtab, settings)
    except Exception as e:
        LOG.error('could not open the temporary database %r of '
                  '<product-config %s> (%s, wait-timeout %d s): %s: %s',
                  settings.database_name, SECTION, settings.describe(),
                  settings.wait_timeout, type(e).__name__, e)
        raise
    LOG.info('temporary database %r at %s from <product-config %s>: %s',
             settings.database_name, settings.mount_point, SECTION,
             settings.describe())
    return factory


# -- the ZCML directive ------------------------------------------------------

try:
    from zope.interface import Interface
except ImportError:  # pragma: no cover (zope.interface comes with Zope)
    Interface = object


class ITemporaryDatabaseFromProductConfig(Interface):
    """``<zeotemp:temporaryDatabaseFromProductConfig />`` (no attributes):
    register the temporary database of ``<product-config zeotemp>``."""


def temporary_database_directive(_context):
    """Handler of the directive: the registration is an action, so it runs
    when Zope executes its ZCML actions, after ``zope.conf`` was read and the
    main database opened, before the application is initialized."""
    _context.action(
        discriminator=('zeotemp.zoperecover', 'product-config', SECTION),
        callable=configure,
        args=(),
    )
