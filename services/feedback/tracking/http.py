"""The tracking endpoint (TRACKING_HTTP_LISTEN): GET /o/<token> answers the 1x1 pixel and records an
Open, GET /c/<token> records a Click and redirects (302) to the original link. Anything else, and any
token this deployment did not sign, is a 404: the endpoint is never an open redirect.

HEAD requests (link scanners, previews) get the same answer but record nothing.
"""

from __future__ import annotations

import base64
import logging

from aiohttp import web

from postmesh.common.tracking import CLICK_PATH, MAX_TOKEN_LENGTH, OPEN_PATH, BadToken
from services.feedback.tracking.recorder import TrackingRecorder

log = logging.getLogger(__name__)

# The smallest transparent GIF (1x1, 43 bytes).
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _not_found() -> web.Response:
    return web.Response(status=404, text="Not Found\n", headers=_NO_CACHE)


class TrackingServer:
    def __init__(
        self, listen: str, recorder: TrackingRecorder, *, trust_forwarded_for: bool, reuse_port: bool = False
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]") or "127.0.0.1"
        self._port = int(port)
        self.recorder = recorder
        self.trust_forwarded_for = trust_forwarded_for
        self._reuse_port = reuse_port
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4096)
        app.router.add_get(f"/{OPEN_PATH}/{{token}}", self._open)
        app.router.add_get(f"/{CLICK_PATH}/{{token}}", self._click)
        return app

    async def start(self) -> int:
        # The token is the whole path: allow long request lines, still bounded.
        self._runner = web.AppRunner(
            self.app(), access_log=None, handler_args={"max_line_size": MAX_TOKEN_LENGTH + 256}
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_port=self._reuse_port or None)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _client(self, request: web.Request) -> tuple[str, str]:
        ip = request.remote or ""
        if self.trust_forwarded_for:
            # The last address is the one our own proxy (the Ingress) added; the ones before it
            # are the client's word.
            forwarded = [
                a.strip() for a in request.headers.get("X-Forwarded-For", "").split(",") if a.strip()
            ]
            if forwarded:
                ip = forwarded[-1]
        return ip, request.headers.get("User-Agent", "")

    async def _open(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        ip, agent = self._client(request)
        try:
            self.recorder.verify(token, link=False)
        except BadToken:
            return _not_found()
        if request.method != "HEAD":
            try:
                await self.recorder.open(token, ip_address=ip, user_agent=agent)
            except Exception:
                # The recipient still gets the pixel; the lost event is in the log.
                log.exception("open event not recorded")
        return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=_NO_CACHE)

    async def _click(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        ip, agent = self._client(request)
        try:
            link = self.recorder.verify(token, link=True).link
        except BadToken:
            return _not_found()
        if request.method != "HEAD":
            try:
                await self.recorder.click(token, ip_address=ip, user_agent=agent)
            except Exception:
                # The recipient still reaches the link; the lost event is in the log.
                log.exception("click event not recorded")
        return web.Response(status=302, headers={**_NO_CACHE, "Location": link})
