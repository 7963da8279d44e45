"""``upload-proxy upload``: a client that streams files to the proxy, resumes and verifies.

Layers, imports flowing one way: :mod:`~proxy.client.cli` (argv -> options -> run, exit
codes) -> :mod:`~proxy.client.transfer` (PUT and tus over aiohttp) -> :mod:`~proxy.client.source`
(files read in fixed chunks, hashed as read), :mod:`~proxy.client.retry` (backoff),
:mod:`~proxy.client.resume` (tus upload URLs kept across runs) and
:mod:`~proxy.client.progress` (what the user sees).  Nothing here imports the daemon's
modules beyond the leaf :mod:`proxy.config` (for size parsing), and never aiobotocore.
"""
