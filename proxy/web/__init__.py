"""HTTP only: the one layer that imports ``aiohttp.web``.

Error rendering (:mod:`.errors`), request preflight (:mod:`.preflight`), the plain upload
routes (:mod:`.uploads`), tus (:mod:`.tus`), the operator endpoints (:mod:`.ops`) and the
connection guard every listener sits behind (:mod:`.conn`).  Handlers turn headers into
calls on :mod:`proxy.tus` and :mod:`proxy.engine`; they never talk to S3 themselves.
"""
