"""The upload page (webui/src/) maps the proxy's error codes to what a sender reads and
does; a code it names that the proxy never sends is a message nobody will ever see (and
the real code falls through to a generic one).  The page's own codes for failures that
never reached the server (ERR_NETWORK, ERR_LOCAL, ERR_HTTP_<status>) are the exception.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE_ONLY = {"ERR_NETWORK", "ERR_LOCAL", "ERR_HTTP_"}


def codes_in(paths: list[Path], pattern: str) -> set[str]:
    return {code for p in paths for code in re.findall(pattern, p.read_text())}


def test_every_code_the_page_maps_is_one_the_proxy_sends() -> None:
    page = codes_in(sorted((ROOT / "webui" / "src").glob("*.js")), r"\b(ERR_[A-Z0-9_]+)")
    proxy = codes_in(sorted((ROOT / "proxy").rglob("*.py")), r'"(ERR_[A-Z0-9_]+)"')
    assert "ERR_TOO_MANY_UNFINISHED_UPLOADS" in proxy and "ERR_EVICTED" in proxy
    assert "ERR_TOO_LARGE" in page  # the scan reads the page's tables at all
    unknown = sorted(page - proxy - PAGE_ONLY)
    assert not unknown, f"webui/src maps codes the proxy never sends: {unknown}"
