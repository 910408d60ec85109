"""A JSON-RPC client for the stack's chain: one kept-alive HTTP connection, raw JSON answers. Used by
the ChangeNOW stand-in's deposit watcher (settlement.py) and by tools/dev (stack.py: fund, status)."""
from __future__ import annotations

import http.client
import itertools
import json
import select
from urllib.parse import urlsplit


class ChainRpc:
    """JSON-RPC calls to the dev chain on one kept-alive HTTP connection, for the deposit watcher's thread.

    web3's HTTPProvider costs about as much CPU per call as signing a payout (its middleware, result
    formatters and requests' session); this stand-in only posts a few known methods and reads raw
    JSON answers. A connection the chain closed (it restarted) is dropped before it is used, as
    requests' pool does; a failed call closes it too: the next call connects afresh. (http.client
    turns Nagle off, as requests does: the body, sent after the headers, is not held back.)
    """

    HEADERS = {"Content-Type": "application/json"}

    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        self.path = parts.path or "/"
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        self.ids = itertools.count(1)

    def call(self, method: str, params: list):
        """The result of one call; RuntimeError with the chain's error object when it refuses."""
        body = json.dumps({"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params}).encode()
        idle = self.connection.sock
        if idle is not None and select.select([idle], [], [], 0)[0]:  # readable between calls: closed by the chain
            self.connection.close()
        try:
            self.connection.request("POST", self.path, body, self.HEADERS)
            answer = json.loads(self.connection.getresponse().read())
        except Exception:
            self.connection.close()
            raise
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]
