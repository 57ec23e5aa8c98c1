"""Rows of generation jobs: written a chunk at a time as the worker makes them, flagged by the
filters, reviewed (approve, reject, edit), then read out as the rows a new dataset is made of.
Knows no HTTP and no model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from amber.store.tables import GeneratedRow

APPROVED, REJECTED = "approved", "rejected"
VIEWS = ("all", "kept", "flagged", "approved", "rejected")


@dataclass(frozen=True)
class GeneratedInfo:
    index: int
    input: str
    output: str
    finish_reason: str
    samples: list[str] | None
    confidence: float | None
    reasons: list[str]
    details: list[str]
    decision: str | None
    edited: bool

    @property
    def included(self) -> bool:
        """In the dataset a save makes: the reviewer's word, else the filters'."""
        return self.decision == APPROVED if self.decision else not self.reasons


def _info(r: GeneratedRow) -> GeneratedInfo:
    return GeneratedInfo(r.idx, r.input, r.output, r.finish_reason, r.samples, r.confidence, list(r.reasons or []),
                         list(r.details or []), r.decision, r.edited)


def _view(query, view: str):
    included = ((func.coalesce(GeneratedRow.decision, "") == APPROVED)  # not NULL: NOT NULL is no "true"
                | (GeneratedRow.decision.is_(None) & (func.json_array_length(GeneratedRow.reasons) == 0)))
    return {
        "all": query,
        "kept": query.where(func.json_array_length(GeneratedRow.reasons) == 0),
        "flagged": query.where(func.json_array_length(GeneratedRow.reasons) > 0),
        "approved": query.where(included),
        "rejected": query.where(~included),
    }[view]


class GeneratedRepo:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def add(self, job_id: int, rows: Iterable) -> None:
        """Rows (amber.datagen.generate.Generated) in one transaction; a row already there (a
        resumed job writing it again) is replaced by the new one."""
        rows = list(rows)
        with self._sessions.begin() as session:
            session.query(GeneratedRow).filter(GeneratedRow.job_id == job_id,
                                               GeneratedRow.idx.in_([r.index for r in rows])).delete()
            session.add_all(GeneratedRow(job_id=job_id, idx=r.index, input=r.input, output=r.output,
                                         finish_reason=r.finish_reason, samples=list(r.samples) or None,
                                         reasons=[], details=[]) for r in rows)

    def count(self, job_id: int) -> int:
        with self._sessions() as session:
            return session.scalar(select(func.count()).where(GeneratedRow.job_id == job_id))

    def all(self, job_id: int) -> list[GeneratedInfo]:
        with self._sessions() as session:
            return [_info(r) for r in session.scalars(select(GeneratedRow).where(GeneratedRow.job_id == job_id)
                                                      .order_by(GeneratedRow.idx))]

    def set_verdicts(self, job_id: int, verdicts: Sequence) -> None:
        """The filters' verdicts (amber.datagen.filters.Verdict) for every row."""
        table = GeneratedRow.__table__
        statement = (update(table).where(table.c.job_id == job_id, table.c.idx == bindparam("at"))
                     .values(reasons=bindparam("r"), details=bindparam("d"), confidence=bindparam("c")))
        params = [{"at": v.index, "r": list(v.reasons), "d": list(v.details), "c": v.confidence} for v in verdicts]
        if params:
            with self._sessions.begin() as session:
                session.connection().execute(statement, params)  # one executemany

    def page(self, job_id: int, view: str = "all", offset: int = 0, limit: int = 50) -> tuple[list[GeneratedInfo], int]:
        query = _view(select(GeneratedRow).where(GeneratedRow.job_id == job_id), view)
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery()))
            rows = session.scalars(query.order_by(GeneratedRow.idx).offset(offset).limit(limit))
            return [_info(r) for r in rows], total

    def counts(self, job_id: int) -> dict[str, int]:
        with self._sessions() as session:
            return {view: session.scalar(select(func.count()).select_from(
                _view(select(GeneratedRow).where(GeneratedRow.job_id == job_id), view).subquery())) for view in VIEWS}

    def review(self, job_id: int, index: int, *, decision: str | None = None, clear: bool = False,
               input: str | None = None, output: str | None = None) -> GeneratedInfo | None:
        """Set the reviewer's decision (`clear`: back to the filters'), and/or edit the row's text
        (an edited row is approved unless rejected in the same call). None: no such row."""
        values: dict = {}
        if input is not None or output is not None:
            values.update(edited=True, decision=APPROVED)
            values.update({k: v for k, v in (("input", input), ("output", output)) if v is not None})
        if decision is not None or clear:
            values["decision"] = decision
        with self._sessions.begin() as session:
            row = session.scalar(select(GeneratedRow).where(GeneratedRow.job_id == job_id, GeneratedRow.idx == index))
            if row is None:
                return None
            for k, v in values.items():
                setattr(row, k, v)
            session.flush()
            return _info(row)
