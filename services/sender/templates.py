"""Stored email templates (domain code: no gRPC here)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.db import transaction
from postmesh.common.errors import AlreadyExists, InvalidArgument, NotFound
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from services.sender import rendering
from services.sender.models import EmailTemplate

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TEMPLATE_BYTES = 500 * 1024  # SES's limit on a template's parts together


@dataclass(frozen=True)
class TemplateContent:
    subject: str
    text: str
    html: str

    def validate(self) -> None:
        if not self.subject.strip():
            raise InvalidArgument("The template needs a subject.", field="template_content.subject")
        if not (self.text.strip() or self.html.strip()):
            raise InvalidArgument("The template needs a text or an HTML part.", field="template_content")
        if len((self.subject + self.text + self.html).encode()) > MAX_TEMPLATE_BYTES:
            raise InvalidArgument("The template is larger than 500 KB.", field="template_content")
        if "\r" in self.subject or "\n" in self.subject:
            raise InvalidArgument(
                "The subject must not contain line breaks.", field="template_content.subject"
            )
        for part, source in (("subject", self.subject), ("text", self.text), ("html", self.html)):
            try:
                rendering.parse(source)
            except rendering.TemplateSyntaxError as exc:
                raise InvalidArgument(
                    f"The template's {part} is malformed: {exc}",
                    field=f"template_content.{part}",
                    reason="INVALID_TEMPLATE",
                ) from None


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(
            "template_name must be 1 to 64 letters, digits, '_' or '-'.", field="template_name"
        )
    return name


class TemplateStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Clock) -> None:
        self._sessions = sessions
        self._clock = clock

    async def create(self, account_id: str, name: str, content: TemplateContent) -> None:
        validate_name(name)
        content.validate()
        now = self._clock.now()
        try:
            async with transaction(self._sessions) as session:
                session.add(
                    EmailTemplate(
                        account_id=account_id,
                        name=name,
                        subject=content.subject,
                        text=content.text,
                        html=content.html,
                        created_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"Template {name} already exists.") from None

    async def _find(self, session: AsyncSession, account_id: str, name: str) -> EmailTemplate:
        validate_name(name)
        row = await session.scalar(
            select(EmailTemplate).where(EmailTemplate.account_id == account_id, EmailTemplate.name == name)
        )
        if row is None:
            raise NotFound(f"Template {name} does not exist.", reason="TEMPLATE_DOES_NOT_EXIST")
        return row

    async def get(self, account_id: str, name: str) -> EmailTemplate:
        async with self._sessions() as session:
            return await self._find(session, account_id, name)

    async def update(self, account_id: str, name: str, content: TemplateContent) -> None:
        content.validate()
        async with transaction(self._sessions) as session:
            row = await self._find(session, account_id, name)
            row.subject, row.text, row.html = content.subject, content.text, content.html
            row.updated_at = self._clock.now()

    async def delete(self, account_id: str, name: str) -> None:
        async with transaction(self._sessions) as session:
            row = await self._find(session, account_id, name)
            await session.execute(delete(EmailTemplate).where(EmailTemplate.id == row.id))

    async def list(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[Sequence[EmailTemplate], str]:
        query = select(EmailTemplate).where(EmailTemplate.account_id == account_id)
        statement, size = keyset_page(query, EmailTemplate.name, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        return split_page(rows, size, lambda t: t.name)
