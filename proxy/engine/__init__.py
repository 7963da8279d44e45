"""The streaming engine, shared by every protocol: no HTTP, no boto.

:mod:`.pipeline` carries body chunks into pooled part buffers (:mod:`.buffers`), hashes
them in order (:mod:`.hashing`) and keeps at most N parts in flight; :mod:`.upload` makes
one object of it (single PUT, or complete + metadata, or abort).  :mod:`.limits` holds the
abuse limits and :mod:`.events` the one place an upload's outcome is reported.
"""
