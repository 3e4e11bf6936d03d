"""Create the /temp_folder mount point once (Zope 4-6 no longer do it).

Run with the instance's configuration, with zeotemp running:

    bin/zconsole run etc/zope.conf add_temp_folder.py

It does what the ZMI does when you add a "ZODB Mount Point" and pick
/temp_folder: it records the mount point in the main database (which is
why this is needed only once, not after each zeotemp restart). The
companion add-on zope/zeotemp.zoperecover does the same when Zope starts.
Tested by tests/e2e/zope.sh on Zope 4, 5 and 6.
"""
import transaction
from Products.ZODBMountPoint.MountedObject import manage_addMounts

app = globals()["app"]  # provided by `zconsole run`
if "temp_folder" in app.objectIds():
    print("/temp_folder already exists")
else:
    manage_addMounts(app, ("/temp_folder",))
    transaction.commit()
    print("/temp_folder created")
