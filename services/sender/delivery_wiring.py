"""Builds the delivery workers from the service's runtime and settings (the one place that knows
gRPC and NATS subscriptions; the delivery code itself takes its parts through constructors)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from postmesh.common.config import Settings
from postmesh.common.service import Runtime
from postmesh.common.streams import IDENTITY_CHANGED_SUBJECT
from postmesh.common.tracking import TokenSigner, TrackedMail
from postmesh.common.verp import VerpKey
from postmesh.events.v1 import events_pb2
from postmesh.identity.v1 import identity_pb2
from services.sender.backoff import RetryPolicy
from services.sender.delivery import DeliveryConfig, DeliveryWorker, HeldMessages
from services.sender.delivery_settings import DELIVERY_MODES, SMARTHOST_TLS_MODES
from services.sender.dkim_signing import (
    FetchConfig,
    SigningConfig,
    SigningConfigCache,
    SigningKey,
    SigningUnavailable,
)
from services.sender.filtration import settings as _filtration_settings  # noqa: F401 (registers them)
from services.sender.filtration.policy import PolicySource
from services.sender.filtration.stage import HEALTH_NAMES, HELD_WAITING, ContentFilters
from services.sender.mx import MxResolver
from services.sender.simulator import MailboxSimulator
from services.sender.tracking import MessageTracking
from services.sender.transport import SinkTransport, SmtpOptions, SmtpPool, SmtpTransport, Transport

log = logging.getLogger(__name__)

# Identity answers these when it has no signing configuration to give: the message goes unsigned.
_NO_KEYS = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION)


def identity_fetcher(runtime: Runtime) -> FetchConfig:
    async def fetch(account_id: str, domain: str) -> SigningConfig:
        try:
            reply = await runtime.clients.identity.GetSigningConfig(
                identity_pb2.GetSigningConfigRequest(account_id=account_id, domain=domain), timeout=10
            )
        except aio.AioRpcError as exc:
            if exc.code() in _NO_KEYS:
                log.warning(
                    "no DKIM signing configuration; sending unsigned",
                    extra={"domain": domain, "code": exc.code().name, "details": exc.details()},
                )
                return SigningConfig(domain)
            raise SigningUnavailable(f"{exc.code().name}: {exc.details()}") from exc
        keys = tuple(SigningKey(k.selector, k.algorithm, k.private_key_pem) for k in reply.keys)
        return SigningConfig(reply.domain or domain, keys)

    return fetch


def _host_port(value: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    return host.strip("[]"), int(port)


def build_transport(settings: Settings) -> Transport:
    mode = settings.delivery_mode.strip().lower()
    if mode not in DELIVERY_MODES:
        raise ValueError(
            f"DELIVERY_MODE={settings.delivery_mode!r}: choose one of {', '.join(DELIVERY_MODES)}"
        )
    if mode == "sink":
        return SinkTransport(Path(settings.data_dir) / "mail")
    tls_mode = settings.smarthost_tls.strip().lower() if mode == "smarthost" else "opportunistic"
    if tls_mode not in SMARTHOST_TLS_MODES:
        raise ValueError(
            f"SMARTHOST_TLS={settings.smarthost_tls!r}: choose one of {', '.join(SMARTHOST_TLS_MODES)}"
        )
    options = SmtpOptions(
        helo_name=reporting_mta(settings),
        timeout=settings.smtp_timeout_seconds,
        tls_verify=settings.smtp_tls_verify,
        tls_mode=tls_mode,
        username=settings.smarthost_username if mode == "smarthost" else "",
        password=settings.smarthost_password if mode == "smarthost" else "",
        max_connections_per_host=settings.smtp_max_connections_per_host,
    )
    pool = SmtpPool(options)
    if mode == "smarthost":
        if not settings.smarthost:
            raise ValueError("DELIVERY_MODE=smarthost needs SMARTHOST (host:port)")
        return SmtpTransport(pool, smarthost=_host_port(settings.smarthost, 587))
    nameservers, dns_port = [], 53
    if settings.dns_resolver.strip():
        address, dns_port = _host_port(settings.dns_resolver.strip(), 53)
        nameservers = [address]
    resolver = MxResolver(nameservers, port=dns_port, timeout=settings.dns_timeout_seconds)
    return SmtpTransport(pool, resolver=resolver, port=settings.smtp_port)


def build_tracking(runtime: Runtime) -> MessageTracking | None:
    settings = runtime.settings
    if not settings.tracking_secret:
        return None
    return MessageTracking(
        signer=TokenSigner(settings.tracking_secret),
        public_url=settings.tracking_public_url,
        listen=settings.tracking_http_listen,
        mails=TrackedMail(runtime.jetstream, settings.tracking_retention_days),
    )


def reporting_mta(settings: Settings) -> str:
    return settings.smtp_helo_name or socket.getfqdn()


class Delivery:
    """The workers of one sender replica, and what they hold (signing cache, SMTP pool)."""

    def __init__(
        self, runtime: Runtime, *, held: HeldMessages | None = None, policies: PolicySource | None = None
    ) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.transport = build_transport(settings)
        self.signing = SigningConfigCache(identity_fetcher(runtime))
        self.filters = ContentFilters.from_settings(settings, policies)
        if self.filters is not None:
            log.info("content filters active", extra={"filters": self.filters.describe()})
        self.worker = DeliveryWorker(
            js=runtime.jetstream,
            events=runtime.events,
            signing=self.signing,
            transport=self.transport,
            config=DeliveryConfig(
                concurrency=settings.delivery_workers,
                bounce_domain=settings.default_bounce_domain,
                reporting_mta=reporting_mta(settings),
                policy=RetryPolicy.from_settings(settings),
                verp_key=VerpKey.from_settings(settings),
                ack_wait_seconds=settings.delivery_ack_wait_seconds,
                shutdown_grace_seconds=settings.shutdown_grace_seconds,
                scan_policy=RetryPolicy(
                    base_minutes=settings.scan_retry_base_seconds / 60,
                    max_minutes=settings.scan_retry_max_seconds / 60,
                    max_age=dt.timedelta(hours=settings.delivery_max_age_hours),
                ),
            ),
            clock=runtime.clock,
            tracking=build_tracking(runtime),
            simulator=MailboxSimulator(settings.simulator_domain),
            filters=self.filters,
            held=held,
        )
        self.held = held
        self._subscription: Any = None

    async def start(self) -> None:
        assert self.runtime.nats is not None

        async def on_identity_changed(msg: Any) -> None:
            event = events_pb2.Event.FromString(msg.data)
            self.signing.forget(event.identity_changed.identity)

        # Core subscription: every replica drops its cached keys (a JetStream publish is also a core message).
        self._subscription = await self.runtime.nats.subscribe(
            IDENTITY_CHANGED_SUBJECT, cb=on_identity_changed
        )
        self.runtime.spawn(self.worker.run, "delivery")
        self.runtime.spawn(self._close_idle_connections, "smtp-idle")
        if self.filters is not None:
            self.runtime.spawn(self._watch_filters, "filtration-watch")

    async def _watch_filters(self) -> None:
        """Keeps the scanner-up and held-messages gauges current even when no mail flows."""
        filters = self.filters
        assert filters is not None
        while True:
            filters.changed.clear()
            await filters.probe()
            if self.runtime.report_health is not None:
                for name, up in filters.up.items():
                    await self.runtime.report_health(HEALTH_NAMES[name], up)
            if self.held is not None:
                HELD_WAITING.set(await self.held.count())
            try:
                # A scan that finds a scanner down (or back) reports it at once.
                async with asyncio.timeout(30):
                    await filters.changed.wait()
            except TimeoutError:
                pass

    async def _close_idle_connections(self) -> None:
        pool = getattr(self.transport, "pool", None)
        if pool is None:
            return
        while True:
            await asyncio.sleep(10)
            await pool.close_idle()

    async def stop(self) -> None:
        if (
            self._subscription is not None
            and self.runtime.nats is not None
            and self.runtime.nats.is_connected
        ):
            await self._subscription.unsubscribe()
        await self.transport.close()
