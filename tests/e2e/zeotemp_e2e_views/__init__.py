"""Test-only browser views for tests/e2e/zope.sh: set and read a session
value through HTTP (``@@e2e-session-set?key=K&value=V``,
``@@e2e-session-get?key=K``) and tell what /temp_folder is
(``@@e2e-status``), and which database each mount path of Zope's database
table comes from (``@@e2e-dbtab``). Loaded only by the e2e instances' ZCML (an
``etc/package-includes`` file), never shipped."""

from Products.Five import BrowserView


class SessionSet(BrowserView):

    def __call__(self):
        key = self.request.form['key']
        value = self.request.form['value']
        self.request.SESSION.set(key, value)
        self.request.response.setHeader('Content-Type', 'text/plain')
        return 'OK ' + value


class SessionGet(BrowserView):

    def __call__(self):
        key = self.request.form['key']
        value = self.request.SESSION.get(key)
        self.request.response.setHeader('Content-Type', 'text/plain')
        return 'MISSING' if value is None else 'VALUE ' + value


class Status(BrowserView):
    """``temp_folder=<meta type or missing> mount_point=<yes|no>
    addon=<yes|no>``: what /temp_folder is, whether it is a ZODB mount point
    recorded in the main database, and whether zeotemp.zoperecover's
    re-mount check is installed."""

    def __call__(self):
        import sys

        from Products.ZODBMountPoint.MountedObject import getMountPoint
        app = self.context
        ob = app._getOb('temp_folder', None)
        meta_type = 'missing' if ob is None else ob.meta_type
        mount_point = ob is not None and getMountPoint(ob) is not None
        remount = sys.modules.get('zeotemp.zoperecover.remount')
        addon = remount is not None and remount._original is not None
        self.request.response.setHeader('Content-Type', 'text/plain')
        return 'temp_folder=%s mount_point=%s addon=%s' % (
            meta_type.replace(' ', '_'), 'yes' if mount_point else 'no',
            'yes' if addon else 'no')


class DBTab(BrowserView):
    """One line per mount path of Zope's database table: ``<path>
    <database name> <product-config|zope.conf> <opened|not-opened>``;
    ``product-config`` when zeotemp.zoperecover registered it from
    ``<product-config zeotemp>``."""

    def __call__(self):
        from App.config import getConfiguration
        dbtab = getConfiguration().dbtab
        lines = []
        for path, name in sorted(dbtab.listMountPaths()):
            factory = dbtab.getDatabaseFactory(name=name)
            source = ('product-config'
                      if getattr(factory, 'zeotemp_settings', None)
                      else 'zope.conf')
            opened = 'opened' if name in dbtab.databases else 'not-opened'
            lines.append(f'{path} {name} {source} {opened}')
        self.request.response.setHeader('Content-Type', 'text/plain')
        return '\n'.join(lines)
