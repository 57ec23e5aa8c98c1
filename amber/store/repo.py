"""All queries: accounts and API keys here, datasets and custom models in `custom_models.py`
(as `store.datasets`, `store.custom_models`), jobs in `jobs.py` (`store.jobs`); plain frozen
dataclasses out.

Callers never see an ORM row or a session. Each method opens its own short session, so one `Store`
can serve many FastAPI handler threads, and several processes can each hold a `Store` on one file.
A key is shown once, at creation; only its sha256 and a short prefix (for listing and revoking)
are stored.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, delete, select, update

from amber.store.custom_models import CustomModelRepo, DatasetRepo
from amber.store.db import insert_for, make_sessions, open_database
from amber.store.generated import GeneratedRepo
from amber.store.jobs import JobRepo
from amber.store.tables import Account, AccountLimits, ApiKey, utcnow
from amber.store.usage import UsageRepo

KEY_PREFIX = "amber-"
PREFIX_CHARS = len(KEY_PREFIX) + 8  # "amber-" alone would tell keys apart by two characters
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


@dataclass(frozen=True)
class AccountInfo:
    id: int
    name: str


@dataclass(frozen=True)
class OwnLimits:
    """An account's own rate limits per minute; None: the server's default, 0: unlimited."""
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    created_at: datetime
    revoked: bool
    name: str | None = None
    key_hash: str = ""  # sha256 of the key: tells which listed key a request used (not a secret)


@dataclass(frozen=True)
class NewKey:
    key: str  # the only time the key's text exists outside its owner
    info: KeyInfo


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_account_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid account name {name!r}: use 1-64 characters, each a letter, "
                         "digit, '.', '_', '-' or '@'")
    return name


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = make_sessions(engine)
        self._insert = insert_for(engine)  # ON CONFLICT, in the engine's dialect
        self.datasets = DatasetRepo(self._sessions)
        self.jobs = JobRepo(self._sessions, lock_rows=engine.dialect.name == "postgresql")
        self.custom_models = CustomModelRepo(self._sessions, self.jobs)
        self.usage = UsageRepo(self._sessions)
        self.generated = GeneratedRepo(self._sessions)

    @classmethod
    def open(cls, url: str) -> Store:
        return cls(open_database(url))

    def close(self) -> None:
        self.engine.dispose()

    def create_key(self, account_name: str, name: str | None = None) -> str:
        """A new key for the account, which is created if missing. The only time the key is seen."""
        return self.issue_key(account_name, name).key

    def issue_key(self, account_name: str, name: str | None = None) -> NewKey:
        """`create_key`, with the new key's listing. `name` is a label the caller has checked."""
        check_account_name(account_name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(key_hash=hash_key(key), prefix=key[:PREFIX_CHARS], name=name, created_at=utcnow())
        with self._sessions.begin() as session:
            # One atomic statement, so two processes creating the same account cannot collide.
            session.execute(self._insert(Account).values(name=account_name, created_at=utcnow())
                            .on_conflict_do_nothing(index_elements=[Account.name]))
            row.account_id = session.scalar(select(Account.id).where(Account.name == account_name))
            session.add(row)
        return NewKey(key, KeyInfo(row.prefix, row.created_at, False, name, row.key_hash))

    def ensure_account(self, account_name: str) -> AccountInfo:
        """The account, created if missing (the CLI acts for a named local account)."""
        check_account_name(account_name)
        with self._sessions.begin() as session:
            session.execute(self._insert(Account).values(name=account_name, created_at=utcnow())
                            .on_conflict_do_nothing(index_elements=[Account.name]))
            row = session.execute(select(Account.id, Account.name).where(Account.name == account_name)).one()
        return AccountInfo(id=row.id, name=row.name)

    def account_for_key(self, key: str) -> AccountInfo | None:
        """The account owning an active key; None for unknown or revoked keys. One indexed lookup."""
        owner = self.key_owner(key)
        return None if owner is None else owner[0]

    def key_owner(self, key: str) -> tuple[AccountInfo, str] | None:
        """The account owning an active key and the key's listed prefix (what usage is recorded under)."""
        query = (select(Account.id, Account.name, ApiKey.prefix).join(ApiKey, ApiKey.account_id == Account.id)
                 .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
        with self._sessions() as session:
            row = session.execute(query).first()
        return None if row is None else (AccountInfo(id=row.id, name=row.name), row.prefix)

    def get_account(self, name: str) -> AccountInfo | None:
        check_account_name(name)
        with self._sessions() as session:
            row = session.execute(select(Account.id, Account.name).where(Account.name == name)).first()
        return None if row is None else AccountInfo(id=row.id, name=row.name)

    def list_keys(self, account_name: str) -> list[KeyInfo]:
        """The account's keys, oldest first, revoked ones included; [] for an unknown account."""
        check_account_name(account_name)
        query = (select(ApiKey.prefix, ApiKey.created_at, ApiKey.revoked_at, ApiKey.name, ApiKey.key_hash)
                 .join(Account, ApiKey.account_id == Account.id)
                 .where(Account.name == account_name).order_by(ApiKey.id))
        with self._sessions() as session:
            rows = session.execute(query).all()
        return [KeyInfo(r.prefix, r.created_at, r.revoked_at is not None, r.name, r.key_hash) for r in rows]

    def revoke_key(self, prefix_or_key: str) -> bool:
        """Revoke one active key, named by its full text or its listed prefix.

        True if a key was revoked now; False if none matched an active key. A prefix that matches
        several active keys revokes nothing and raises ValueError.
        """
        if len(prefix_or_key) > PREFIX_CHARS:
            return self._revoke(ApiKey.key_hash == hash_key(prefix_or_key))
        return self._revoke(ApiKey.prefix == prefix_or_key)

    def revoke_own_key(self, account_id: int, prefix: str) -> bool:
        """Revoke the account's active key with this listed prefix; another account's is never
        touched. True if one was revoked now; ValueError (nothing revoked) if several match."""
        return self._revoke(ApiKey.prefix == prefix, ApiKey.account_id == account_id)

    def _revoke(self, *match) -> bool:
        statement = (update(ApiKey).where(*match, ApiKey.revoked_at.is_(None))
                     .values(revoked_at=utcnow()).execution_options(synchronize_session=False))
        with self._sessions() as session, session.begin():
            # The UPDATE is the check: counting first would race with another process's insert.
            revoked = session.execute(statement).rowcount
            if revoked > 1:  # raising inside the transaction rolls the UPDATE back
                raise ValueError(f"that prefix matches {revoked} active keys; give the full key")
        return revoked == 1

    def own_limits(self, account_id: int) -> OwnLimits:
        """The account's own rate limits (all None when it has none). One primary-key lookup."""
        with self._sessions() as session:
            row = session.get(AccountLimits, account_id)
        return OwnLimits() if row is None else OwnLimits(row.rpm, row.tpm)

    def set_limits(self, account_id: int, rpm: int | None, tpm: int | None) -> OwnLimits:
        """Set the limits given (None leaves one as it is); the account's own limits after."""
        values = {k: v for k, v in (("rpm", rpm), ("tpm", tpm)) if v is not None}
        if values:
            with self._sessions.begin() as session:
                session.execute(self._insert(AccountLimits).values(account_id=account_id, **values)
                                .on_conflict_do_update(index_elements=[AccountLimits.account_id], set_=values))
        return self.own_limits(account_id)

    def reset_limits(self, account_id: int) -> None:
        """Back to the server's defaults."""
        with self._sessions.begin() as session:
            session.execute(delete(AccountLimits).where(AccountLimits.account_id == account_id))
