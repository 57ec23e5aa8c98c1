"""The caller's account and API keys over HTTP: listing (which key is this request's), creating a
named key shown once, revoking only one's own, and the effective rate limits."""
from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from tests.api.conftest import AMBER, create_key

PREFIX_CHARS = 14


def call(server, method: str, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.url}/studio/v1{path}", timeout=30,
                         headers={"Authorization": f"Bearer {key or server.key}"}, **kwargs)


def test_a_new_key_is_shown_once_listed_by_prefix_and_works(server):
    r = call(server, "POST", "/keys", json={"name": "  laptop  "})
    assert r.status_code == 200, r.text
    new = r.json()
    assert set(new) == {"key", "prefix", "name", "createdAt"}
    assert new["name"] == "laptop" and new["prefix"] == new["key"][:PREFIX_CHARS]
    listed = call(server, "GET", "/keys", key=new["key"]).json()["keys"]
    assert [k["prefix"] for k in listed][0] == server.key[:PREFIX_CHARS]  # oldest first
    mine = [k for k in listed if k["prefix"] == new["prefix"]]
    assert mine == [{"prefix": new["prefix"], "name": "laptop", "createdAt": new["createdAt"],
                     "revoked": False, "current": True}]
    assert [k["current"] for k in listed].count(True) == 1
    assert all("key" not in k for k in listed)
    assert new["key"] not in (server.home / "server.log").read_text()
    unnamed = call(server, "POST", "/keys")  # no body: a key without a name
    assert unnamed.status_code == 200 and unnamed.json()["name"] is None


def test_current_is_told_by_hash_not_prefix(server):
    listed = call(server, "GET", "/keys").json()["keys"]
    assert [k["prefix"] for k in listed if k["current"]] == [server.key[:PREFIX_CHARS]]


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "   "}, {"name": "x" * 65}, {"name": "tab\there"},
                                  {"name": 5}, {"name": "ok", "scopes": ["all"]}])
def test_bad_names_are_422s_naming_the_field(server, body):
    r = call(server, "POST", "/keys", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:2] in (["body", "name"], ["body", "scopes"])


def test_revoking_a_key_of_ones_own(server):
    new = call(server, "POST", "/keys", json={"name": "short-lived"}).json()
    r = call(server, "DELETE", f"/keys/{new['prefix']}")
    assert r.status_code == 200 and r.json() == {"prefix": new["prefix"], "revoked": True}
    assert call(server, "GET", "/keys", key=new["key"]).status_code == 401
    listed = {k["prefix"]: k for k in call(server, "GET", "/keys").json()["keys"]}
    assert listed[new["prefix"]]["revoked"] is True
    assert call(server, "DELETE", f"/keys/{new['prefix']}").status_code == 404  # already revoked
    assert call(server, "DELETE", "/keys/amber-nothing").status_code == 404


def test_another_accounts_key_is_a_404_and_stays_active(server):
    bobs = call(server, "POST", "/keys", key=server.other_key, json={"name": "bob's"}).json()
    r = call(server, "DELETE", f"/keys/{bobs['prefix']}")
    assert r.status_code == 404, r.text
    assert call(server, "GET", "/keys", key=bobs["key"]).status_code == 200  # not revoked
    alices = {k["prefix"] for k in call(server, "GET", "/keys").json()["keys"]}
    assert bobs["prefix"] not in alices
    assert call(server, "DELETE", f"/keys/{bobs['prefix']}", key=bobs["key"]).status_code == 200


def test_keys_need_a_key(server):
    assert httpx.get(f"{server.url}/studio/v1/keys").status_code == 401
    assert httpx.get(f"{server.url}/studio/v1/account").status_code == 401


def test_account_shows_its_name_and_effective_limits(server):
    assert call(server, "GET", "/account").json() == {"name": "alice", "limits": {"rpm": None, "tpm": None}}
    env = {**os.environ, "AMBER_HOME": str(server.home)}
    carol = create_key(env, "carol")
    subprocess.run([AMBER, "accounts", "limits", "carol", "--rpm", "1000"], env=env, check=True, capture_output=True)
    assert call(server, "GET", "/account", key=carol).json() == {"name": "carol", "limits": {"rpm": 1000, "tpm": None}}
