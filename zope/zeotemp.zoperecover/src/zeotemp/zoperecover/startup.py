"""At startup: install the re-mount check and create missing temporary
mount points (``/temp_folder``), which Zope 4, 5 and 6 no longer do by
themselves.

Only mount paths of ``zope.conf`` whose ``<zodb_db>`` has ``container-class
Products.TemporaryFolder.TemporaryContainer`` are created, as the ZMI's
"ZODB Mount Point" form or ``config/add_temp_folder.py`` would: the mount
point is recorded in the main database, once.
"""

import logging

import transaction
from ZODB.POSException import ConflictError

from . import remount


LOG = logging.getLogger('zeotemp.zoperecover')

TEMPORARY_CONTAINER = 'Products.TemporaryFolder.TemporaryContainer'


def temporary_mount_paths(dbtab):
    """Mount paths configured with a TemporaryContainer container class."""
    paths = []
    for path, _name in dbtab.listMountPaths():
        if not path or path == '/':
            continue
        try:
            factory = dbtab.getDatabaseFactory(path)
            container_class = factory.getMountParams(path)[2]
        except Exception:
            continue
        if container_class == TEMPORARY_CONTAINER:
            paths.append(path)
    return sorted(paths)


def missing_mount_points(app, paths):
    """The paths at which ``app`` has nothing (a mount point to create)."""
    return [p for p in paths if app.unrestrictedTraverse(p, None) is None]


def ensure_temporary_mounts(db, dbtab, attempts=3):
    """Create the missing temporary mount points; return the paths created.

    Two instances starting at once may both try: the one that gets a
    ConflictError looks again.
    """
    from AccessControl.SecurityManagement import newSecurityManager
    from AccessControl.SecurityManagement import noSecurityManager
    from AccessControl.users import system
    from Products.ZODBMountPoint.MountedObject import manage_addMounts

    paths = temporary_mount_paths(dbtab)
    if not paths:
        return []
    for attempt in range(attempts):
        conn = db.open()
        newSecurityManager(None, system)
        try:
            app = conn.root().get('Application')
            if app is None:
                return []
            missing = missing_mount_points(app, paths)
            if not missing:
                return []
            manage_addMounts(app, missing)
            transaction.get().note('zeotemp.zoperecover: add mount points '
                                   + ', '.join(missing))
            transaction.commit()
            LOG.info('created the mount point(s) %s', ', '.join(missing))
            return missing
        except ConflictError:
            transaction.abort()
            if attempt + 1 == attempts:
                raise
        finally:
            noSecurityManager()
            transaction.abort()
            conn.close()
    return []


def database_opened(event):
    """Subscriber for ``zope.processlifetime.IDatabaseOpenedWithRoot``."""
    remount.install()
    from App.config import getConfiguration
    dbtab = getattr(getConfiguration(), 'dbtab', None)
    if dbtab is None:
        return
    try:
        ensure_temporary_mounts(event.database, dbtab)
    except Exception:
        # Zope still starts; the ZMI's mount point form, or
        # config/add_temp_folder.py of zeotemp, can do it later.
        LOG.exception('could not create the temporary mount points')
