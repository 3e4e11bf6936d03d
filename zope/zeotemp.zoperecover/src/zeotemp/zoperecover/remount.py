"""Re-mount a mount point after its database's ZEO client dropped its cache.

A mount point (``Products.ZODBMountPoint.MountedObject``, stored in the main
database, one copy per main-database connection) keeps the object it mounted
in the volatile attribute ``_v_data`` for as long as it stays in that
connection's cache. When zeotemp restarts, every ZEO client reconnects, finds
its cache too old to verify (the new server has a newer last transaction and
none of the old transactions), notifies ``ZEO.interfaces.StaleCache``, drops
its cache and has its connections invalidate every object. The mounted
``temp_folder`` then becomes a ghost of an object the new server never had:
each access raises POSKeyError, and since ``_v_data`` still holds it, the
mount point never looks it up again.

``install()`` wraps ``MountedObject._getOrOpenObject`` so that a mounted
object is dropped, and looked up again from the database's root (which
creates ``temp_folder`` again when it is missing, as for a first mount with
a ``container-class``), when

* its database's storage was sent ``StaleCache`` since it was mounted
  (``stale_cache`` counts these events per storage);
* it is a ghost that cannot be loaded (POSKeyError): the same restart, seen
  by a request whose transaction started before the client dropped its cache;
* it has no database connection any more: it was created by a transaction
  that was aborted (two instances re-creating ``temp_folder`` at once, one
  of them retried after a ConflictError).
"""

import logging
import threading

from ZODB.POSException import POSKeyError


LOG = logging.getLogger('zeotemp.zoperecover')

# id(storage) -> number of StaleCache events seen for it. Storages live as
# long as the process, so their id() is not reused while they matter.
_generations = {}
_lock = threading.Lock()

_original = None


def stale_cache(event):
    """Subscriber for ``ZEO.interfaces.StaleCache``.

    ZEO sends it from its I/O thread, just before it clears its cache and
    invalidates the database's connections; requests notice the new count
    the next time they traverse a mount point on that storage.
    """
    storage = event.storage
    with _lock:
        _generations[id(storage)] = _generations.get(id(storage), 0) + 1
    LOG.warning(
        'ZEO client %s dropped its cache (server restarted?): '
        'mount points on it will mount again',
        getattr(storage, '__name__', '') or storage)


def generation(storage):
    """How many times ``storage``'s client dropped its cache."""
    return _generations.get(id(storage), 0)


def _stale_reason(mount_point, data):
    """Why the mounted ``data`` must be looked up again, or None."""
    jar = getattr(data, '_p_jar', None)
    if jar is None:
        return 'it was created by an aborted transaction'
    mounted = mount_point.__dict__.get('_v_zeotemp_generation')
    if mounted is not None:
        try:
            storage = jar.db().storage
        except Exception:
            storage = None
        if storage is not None and mounted != (id(storage),
                                               generation(storage)):
            return 'its ZEO client dropped its cache'
    if getattr(data, '_p_changed', 0) is None:  # a ghost: can it load?
        try:
            data._p_activate()
        except POSKeyError:
            return 'it is gone from its database (POSKeyError)'
        except Exception:
            # Disconnected, conflict...: not ours to decide; the request
            # gets the error when it uses the object, and the next one
            # checks again.
            pass
    return None


def _getOrOpenObject(self, parent):
    t = self._v_data
    if t is not None:
        reason = _stale_reason(self, t[0])
        if reason is None:
            return _original(self, parent)
        LOG.info('mounting %s again: %s', self._path, reason)
        self._v_data = None
    # Read the storage's count before mounting: a StaleCache that arrives
    # while mounting makes the next request mount again.
    try:
        storage = self._getDB().storage
        mounted = (id(storage), generation(storage))
    except Exception:
        mounted = None  # _original reports the database error
    result = _original(self, parent)
    if mounted is not None and self._v_data is not None:
        self._v_zeotemp_generation = mounted
    return result


def install():
    """Wrap ``MountedObject._getOrOpenObject`` (once; idempotent)."""
    global _original
    from Products.ZODBMountPoint.MountedObject import MountedObject
    if _original is not None:
        return
    _original = MountedObject._getOrOpenObject
    MountedObject._getOrOpenObject = _getOrOpenObject
    LOG.debug('installed the re-mount check on MountedObject')


def uninstall():
    """Undo ``install()`` (for tests)."""
    global _original
    from Products.ZODBMountPoint.MountedObject import MountedObject
    if _original is None:
        return
    MountedObject._getOrOpenObject = _original
    _original = None
