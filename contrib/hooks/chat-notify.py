#!/usr/bin/env python3
"""Example upload-proxy hook receiver: "new recording arrived" in a chat.

Posts a line for every post-finish (and post-fail) to an ntfy topic (NTFY_URL, e.g.
https://ntfy.sh/my-uploads) or a Discord/Slack-style webhook (CHAT_WEBHOOK_URL, JSON
{"content": ...}).  Standard library only.  Two ways to run it:

* as the proxy's executable hook:   [hooks] exec_path = "/usr/local/bin/chat-notify"
  (the event type is argv[1], the JSON on stdin).  The proxy gives hooks a minimal
  environment (PATH, HOOK_EVENT_ID, HOOK_EVENT_TYPE: never its S3 credentials), so set
  the URL in a wrapper: printf '#!/bin/sh\nNTFY_URL=https://ntfy.sh/my-uploads exec
  /usr/local/bin/chat-notify.py "$@"\n' > /usr/local/bin/chat-notify;
* as an HTTP receiver:              chat-notify.py --listen 127.0.0.1:9000
  with [hooks] http_url = "http://127.0.0.1:9000/" and the same secret file in
  HOOK_SECRET_FILE; requests whose Hook-Signature does not match are refused.

It remembers the EventIDs it has posted (SEEN_FILE, default /tmp/chat-notify.seen) so a
redelivered post-finish is not announced twice.  Exit 0 / 2xx only once the chat took
the message: otherwise the proxy keeps the event and tries again later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

SEEN = Path(os.environ.get("SEEN_FILE", "/tmp/chat-notify.seen"))


def message(event: dict) -> str | None:
    upload = event["Event"]["Upload"]
    key = upload["Storage"]["Key"]
    name = upload["MetaData"].get("filename") or key.rsplit("/", 1)[-1]
    if event["Type"] == "post-finish":
        return f"New recording arrived: {name} ({upload['Size'] / 2**20:.1f} MiB)"
    if event["Type"] == "post-fail":
        reason = event["Event"]["Proxy"]["Reason"] or {}
        return f"Upload of {name} failed: {reason.get('Message', 'unknown reason')}"
    return None


def post(text: str) -> None:
    if url := os.environ.get("NTFY_URL"):
        req = urllib.request.Request(url, data=text.encode(), headers={"Title": "Upload"})
    elif url := os.environ.get("CHAT_WEBHOOK_URL"):
        body = json.dumps({"content": text}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    else:
        print(text, file=sys.stderr)
        return
    with urllib.request.urlopen(req, timeout=5) as resp:  # raises on 4xx/5xx
        resp.read()


def handle(event: dict) -> None:
    event_id = event["EventID"]
    seen = SEEN.read_text().split() if SEEN.exists() else []
    if event_id in seen:
        return  # a redelivery: announced already
    text = message(event)
    if text is not None:
        post(text)
    with SEEN.open("a") as f:
        f.write(event_id + "\n")


class Receiver(BaseHTTPRequestHandler):
    secret = b""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        want = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(self.headers.get("Hook-Signature", ""), want):
            self.send_response(401)
        else:
            try:
                handle(json.loads(body))
                self.send_response(204)
            except Exception as e:  # the proxy retries post-finish until we say yes
                print(f"chat-notify: {e}", file=sys.stderr)
                self.send_response(503)
        self.end_headers()


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--listen":
        host, _, port = sys.argv[2].rpartition(":")
        Receiver.secret = Path(os.environ["HOOK_SECRET_FILE"]).read_text().strip().encode()
        HTTPServer((host, int(port)), Receiver).serve_forever()
        return 0
    handle(json.load(sys.stdin))  # executable hook: an exception exits 1, the proxy retries
    return 0


if __name__ == "__main__":
    sys.exit(main())
