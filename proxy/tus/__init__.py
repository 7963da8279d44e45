"""tus uploads on the storage interface: the service (create, write, finish, terminate),
the PATCH writer over the engine's pipeline, the state and lease kept in the bucket, and
the maintenance sweep.  No HTTP here (that is :mod:`proxy.web.tus`)."""
