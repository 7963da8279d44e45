"""The S3 backend: :class:`S3Storage` over aiobotocore, the only package that imports boto.

``from proxy.storage.s3 import S3Storage`` is the way in; the modules are its parts:

* ``store.py``: :class:`S3Storage`, the storage protocol (``proxy.storage.base``) as S3
  calls: the client's configuration and lifecycle, writes, multipart uploads, listings;
* ``calls.py``: how one call is made: the retry policy and the translation of every
  botocore / aiohttp failure into :mod:`proxy.errors` (and who may send a request twice);
* ``reads.py``: GetObject as the daemon reads: small objects, streams, byte ranges, and
  the check that a stored object holds exactly a body we sent;
* ``copies.py``: server-side copies (CopyObject in place, UploadPartCopy, a multipart
  copy built of them): relabelling an object, copying one key to another;
* ``body.py``: a part's bytes as an aiohttp payload (no copy, a stall timeout): the
  backend's one use of aiohttp internals.
"""

from proxy.storage.s3.store import S3Storage

__all__ = ["S3Storage"]
