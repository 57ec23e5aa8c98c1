"""Usage rows: a finish happens once; rows a crash left running are closed at start-up."""
from __future__ import annotations

from datetime import date, timedelta

from amber.store.repo import Store


def test_finish_once_and_interrupted_after_a_crash(database_url):
    url = database_url
    store = Store.open(url)
    account, prefix = store.key_owner(store.create_key("alice"))
    store.usage.start("a", account.id, prefix, "openai", "/v1/completions")
    store.usage.start("b", account.id, prefix, "ai21", "/studio/v1/j2-light/complete")
    assert store.usage.finish("a", "ok", 200, "j2-light", 5, 7, 12.0, 3.0)
    assert not store.usage.finish("a", "error", 500, "j2-light", 9, 9, 1.0, None)  # no second count
    store.close()  # "b" is cut off, as by a crash
    again = Store.open(url)
    assert again.usage.interrupt_running() == 1
    today = date.today()
    rows = {r.id: r for r in again.usage.records(account.id, today - timedelta(days=1), today + timedelta(days=1))}
    assert (rows["a"].status, rows["a"].prompt_tokens, rows["a"].completion_tokens) == ("ok", 5, 7)
    assert rows["b"].status == "interrupted"
    (group_b, group_a) = sorted(again.usage.summary(account.id, today - timedelta(days=1), today + timedelta(days=1)),
                                key=lambda g: g.model or "")  # None (the interrupted row) first
    assert group_a.requests == 1 and group_a.prompt_tokens == 5 and group_b.failed == 1
