"""Zope add-on for zeotemp (a ZEO server of temporary, in-RAM storages).

Loaded by ZCML (``<include package="zeotemp.zoperecover" />``), it

* re-mounts a mount point (``/temp_folder``) whose database's ZEO client
  dropped its cache, which is what happens when zeotemp restarts: stock
  Zope keeps the mount point's reference to the old ``temp_folder`` and
  answers POSKeyError until it is restarted (``remount``);
* creates, at startup, the mount points of ``zope.conf``'s temporary
  databases (``container-class Products.TemporaryFolder.TemporaryContainer``)
  that the main database does not have yet, which Zope 4, 5 and 6 no longer do
  by themselves (``startup``).
"""
