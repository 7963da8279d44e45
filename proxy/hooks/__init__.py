"""Upload events for the application around the proxy, in tusd v2's hook format.

:mod:`.payload` builds the JSON a receiver gets and reads its answer, :mod:`.transports`
sends it (HTTP POST signed with HMAC-SHA256, or an executable), :mod:`.outbox` keeps every
``post-finish`` in the bucket until a receiver acknowledged it, and :mod:`.dispatch` is what
the upload paths call (:class:`~proxy.hooks.dispatch.Hooks`).  No aiohttp.web, no boto.
"""
