"""``upload.key_template``: how the proxy names the objects whose key it chooses.

Plain ``POST /uploads`` (and each file of a form) and tus creations get a generated key;
a ``PUT /uploads/{key}`` names its own.  The template is checked once, at start-up
(:meth:`KeyTemplate.parse` raises ``ValueError`` with the reason), so a typo stops the
daemon instead of failing uploads.  Placeholders:

``{yyyy}`` ``{mm}`` ``{dd}`` ``{hh}``  the UTC date and hour of the creation
``{id}``                                a random id (32 hex digits; a tus upload's storage id)
``{filename}``                          the client's file name, sanitised (``upload`` if none)
``{ext}``                               its extension, lower case with the dot (``.jpg``), or empty
``{prefix}``                            the caller's key prefix (a signed URL's), only at the start

``{id}`` is required: two uploads must never be given one key.  A caller's prefix is a
restriction, never optional: when the template does not start with ``{prefix}`` the
prefix is put in front anyway.
"""

from __future__ import annotations

import string
import time
import uuid
from dataclasses import dataclass

from proxy.errors import InvalidKey
from proxy.keys import safe_extension, safe_filename, validate_key

PLACEHOLDERS = ("yyyy", "mm", "dd", "hh", "id", "filename", "ext", "prefix")
# What a missing file name renders as in {filename}.
NO_FILENAME = "upload"


@dataclass(frozen=True)
class KeyTemplate:
    """A validated template; ``render`` gives the key relative to ``upload.key_prefix``."""

    text: str

    @classmethod
    def parse(cls, text: str) -> KeyTemplate:
        try:
            parsed = [
                (f, spec, conv)
                for _, f, spec, conv in string.Formatter().parse(text)
                if f is not None
            ]
        except ValueError as e:
            raise ValueError(f"malformed template {text!r}: {e}") from None
        fields = [f for f, _, _ in parsed]
        unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
            )
        if any(spec or conv for _, spec, conv in parsed):
            raise ValueError("placeholders take no format spec or conversion")
        if "id" not in fields:
            raise ValueError("must contain {id}: two uploads must never get one key")
        if "prefix" in fields and not text.startswith("{prefix}"):
            raise ValueError("{prefix} may only stand at the start")
        template = cls(text)
        # A sample with a long, odd file name: the result must be a valid key.
        try:
            validate_key(template.render("a" * 32, "Sample Name.JPG", prefix="p/", now_s=0.0))
            validate_key(template.render("a" * 32, None, prefix="", now_s=0.0))
        except InvalidKey as e:
            raise ValueError(f"does not make a valid key: {e.message}") from None
        return template

    def render(
        self, upload_id: str, filename: str | None, *, prefix: str = "", now_s: float | None = None
    ) -> str:
        t = time.gmtime(time.time() if now_s is None else now_s)
        values = {
            "yyyy": f"{t.tm_year:04d}",
            "mm": f"{t.tm_mon:02d}",
            "dd": f"{t.tm_mday:02d}",
            "hh": f"{t.tm_hour:02d}",
            "id": upload_id,
            "filename": safe_filename(filename) or NO_FILENAME,
            "ext": safe_extension(filename),
            "prefix": prefix,
        }
        key = self.text.format(**values)
        if prefix and not self.text.startswith("{prefix}"):
            key = prefix + key
        return key


def new_random_id() -> str:
    return uuid.uuid4().hex
