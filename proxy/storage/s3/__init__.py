"""The S3 backend: :class:`S3Storage` over aiobotocore, the only package that imports boto.

``from proxy.storage.s3 import S3Storage`` is the way in; the modules are its parts:

* ``store.py``: :class:`S3Storage`, the storage protocol (``proxy.storage.base``) as S3 calls.
"""

from proxy.storage.s3.store import S3Storage

__all__ = ["S3Storage"]
