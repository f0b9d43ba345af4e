"""The HTTPS endpoint of SNS-format destinations (SNS_HTTPS_LISTEN), answering what SNS's own host
answers for its subscribers:

- GET /SimpleNotificationService-<id>.pem: the signing certificate (SigningCertURL);
- GET /?Action=ConfirmSubscription&TopicArn=...&Token=...: the SubscribeURL, confirming a subscription;
- GET /?Action=Unsubscribe&SubscriptionArn=...: the UnsubscribeURL.

Replies are SNS's XML. Subscriptions are the dispatcher's: it answers through SubscriptionCallbacks;
without a dispatcher there are no subscriptions, and every token is unknown (404).
"""

from __future__ import annotations

import logging
import ssl
import uuid

from aiohttp import web

from postmesh.common.xmltext import escape
from services.feedback.destinations.sns import SubscriptionCallbacks
from services.feedback.destinations.sns_keys import SigningIdentity

log = logging.getLogger(__name__)

_NS = "http://sns.amazonaws.com/doc/2010-03-31/"


def _xml(status: int, body: str) -> web.Response:
    return web.Response(
        status=status,
        text=f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n',
        content_type="text/xml",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _xml(
        status,
        f'<ErrorResponse xmlns="{_NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{escape(message)}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>",
    )


def _ok(action: str, result: str = "") -> web.Response:
    inner = f"<{action}Result>{result}</{action}Result>" if result else ""
    return _xml(
        200,
        f'<{action}Response xmlns="{_NS}">{inner}'
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></{action}Response>",
    )


class SnsEndpoint:
    def __init__(
        self, listen: str, identity: SigningIdentity, callbacks: SubscriptionCallbacks | None = None
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]") or "127.0.0.1"
        self._port = int(port)
        self.identity = identity
        self.callbacks = callbacks
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def cert_path(self) -> str:
        return f"/SimpleNotificationService-{self.identity.cert_id}.pem"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4096)
        app.router.add_get(self.cert_path, self._certificate)
        app.router.add_get("/", self._action)
        return app

    async def start(self) -> int:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.identity.cert_file, self.identity.key_file)
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port, ssl_context=context).start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _certificate(self, request: web.Request) -> web.Response:
        return web.Response(body=self.identity.cert_pem, content_type="application/x-pem-file")

    async def _action(self, request: web.Request) -> web.Response:
        query = request.query
        action = query.get("Action", "")
        if action == "ConfirmSubscription":
            topic, token = query.get("TopicArn", ""), query.get("Token", "")
            if not topic or not token:
                return _error(400, "InvalidParameter", "TopicArn and Token are required.")
            arn = await self.callbacks.confirm(topic, token) if self.callbacks else None
            if arn is None:
                return _error(404, "NotFound", "No pending subscription has this token.")
            return _ok(action, f"<SubscriptionArn>{escape(arn)}</SubscriptionArn>")
        if action == "Unsubscribe":
            subscription = query.get("SubscriptionArn", "")
            if not subscription:
                return _error(400, "InvalidParameter", "SubscriptionArn is required.")
            if not (self.callbacks and await self.callbacks.unsubscribe(subscription)):
                return _error(404, "NotFound", "No subscription has this ARN.")
            return _ok(action)
        return _error(400, "InvalidAction", "Unknown action.")
