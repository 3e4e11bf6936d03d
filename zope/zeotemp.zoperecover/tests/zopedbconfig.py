"""The section a ``<zodb_db>`` of zope.conf gives Zope's database factory
(``Zope2.Startup.datatypes.ZopeDatabase``), with a storage factory of the
test's own, for the add-on's tests."""


class DBConfig:
    """The attributes Zope2.Startup.datatypes.ZopeDatabase reads."""

    def __init__(self, name, mount_points, storage_factory,
                 container_class=None):
        self.name = name
        self.database_name = None
        self.mount_points = mount_points
        self.storage = storage_factory
        self.container_class = container_class
        self.cache_size = 5000
        self.cache_size_bytes = 0
        self.class_factory = None
        self.connection_class = None
        self.historical_pool_size = 3
        self.historical_cache_size = 1000
        self.historical_cache_size_bytes = 0
        self.historical_timeout = 300
        self.pool_size = 7
        self.pool_timeout = 1 << 31
        self.allow_implicit_cross_references = False
        self.large_record_size = 1 << 24

    def getSectionName(self):
        return self.name
