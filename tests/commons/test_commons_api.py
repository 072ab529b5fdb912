"""The commons API over TestClient, on SQLite and on a real PostgreSQL: permissions, every rejection reason,
size limits, datasets, pulls and the OpenAPI document."""

import json
import math
import struct

import pytest
import torch
from commons_helpers import make_contribution, write_csv
from helpers import toy_texts

from potluck.commons.client import CommonsRequestError
from potluck.errors import UserError

HIDDEN_Q = "encoder.layer.0.attention.self.query.weight"


def refused(call, status: int, match: str) -> CommonsRequestError:
    with pytest.raises(CommonsRequestError) as info:
        call()
    assert info.value.status == status, info.value
    assert match in info.value.detail, info.value.detail
    return info.value


@pytest.fixture
def acme(made):
    """A contributor with its task acme-urgency (labels calm, urgent)."""
    client = made.client(made.invite("acme"))
    client.ensure_task("acme-urgency", ["calm", "urgent"])
    return client


def test_health_needs_no_token_everything_else_does(made):
    anonymous = made.client(None)
    assert anonymous.get("/v1/health")["status"] == "ok"
    refused(anonymous.status, 401, "no token")
    refused(made.client("pk_not-a-real-token").status, 401, "unknown or revoked token")
    assert made.client(made.admin).get("/v1/me")["role"] == "admin"


def test_roles_and_ownership(made, acme):
    admin = made.client(made.admin)
    reader = made.client(made.invite("viewer", "reader"))
    globex = made.client(made.invite("globex"))
    assert reader.status()["tasks"][0]["name"] == "acme-urgency"  # readers look and pull
    refused(lambda: reader.invite("mallory"), 403, "needs a admin")
    refused(lambda: globex.invite("mallory"), 403, "needs a admin")
    refused(lambda: globex.get("/v1/contributors"), 403, "needs a admin")
    refused(lambda: reader.request("PUT", "/v1/tasks/viewer-task", json={"labels": ["a", "b"]}), 403, "contributor")
    refused(lambda: reader.lease("w"), 403, "contributor")
    refused(lambda: globex.request("PUT", "/v1/tasks/acme-urgency", json={"labels": ["a", "b"]}), 403,
            "belongs to acme")
    refused(lambda: admin.invite("acme"), 409, "already exists")
    assert {c["name"] for c in admin.get("/v1/contributors")} == {"admin", "acme", "viewer", "globex"}
    assert all("token" not in c and "token_hash" not in c for c in admin.get("/v1/contributors"))


def test_names_are_validated(made, acme):
    admin = made.client(made.admin)
    for bad in ("Acme", "a", "acme_corp", "-x", "x" * 64):
        refused(lambda bad=bad: admin.invite(bad), 422, "name")
        refused(lambda bad=bad: acme.request("PUT", f"/v1/tasks/{bad}", json={"labels": ["a", "b"]}), 422, "")
    refused(lambda: admin.invite("bob", "superuser"), 422, "role")


def test_json_bodies_are_size_limited(made, acme):
    huge = {"labels": ["a", "b"], "description": "x" * 400_000}
    refused(lambda: acme.request("PUT", "/v1/tasks/big", json=huge), 413, "")


def test_an_accepted_weights_contribution(made, acme, tmp_path):
    before = set(made.commons.store.list())
    record = acme.upload("/v1/tasks/acme-urgency/weights", make_contribution(made.commons, tmp_path / "ok.safetensors"))
    assert record["status"] == "accepted" and record["base_version"] == 0 and record["n_examples"] == 100
    assert record["metrics"] == {"macro_f1": 0.9} and 0 < record["details"]["relative_change"] < 0.1
    assert set(made.commons.store.list()) - before == {record["blob_sha"], record["head_sha"]}
    head = made.client(made.admin).get("/v1/tasks/acme-urgency")["heads"]
    assert head[0]["blob_sha"] == record["head_sha"] and head[0]["labels"] == ["calm", "urgent"]
    from safetensors import safe_open

    with safe_open(str(made.commons.store.path(record["head_sha"])), "pt") as f:
        assert sorted(f.keys()) == ["classifier.bias", "classifier.weight"]


def test_every_rejection_reason_is_recorded_and_returned(made, acme, tmp_path):
    c = made.commons
    shapes = c.registry.base(0).spec

    def nan(t):
        t[HIDDEN_Q][0, 0] = math.nan

    def inf_in_head(t):
        t["head.classifier.bias"][1] = math.inf

    def head_rows(t):
        t["head.classifier.weight"] = torch.zeros(3, shapes[HIDDEN_Q][1][0])
        t["head.classifier.bias"] = torch.zeros(3)

    cases = [  # (what, how to build it, HTTP status, the reason must say)
        ("unknown base version", dict(meta={"base_version": "7"}), 422, "declared base version 7 does not exist"),
        ("base hash mismatch", dict(sha="b" * 64), 422, "does not match base version 0"),
        ("missing tensor", dict(mutate=lambda t: t.pop(HIDDEN_Q)), 422, "missing tensor"),
        ("unexpected tensor", dict(mutate=lambda t: t.__setitem__("extra.weight", torch.zeros(2))), 422,
         "unexpected tensor"),
        ("wrong shape", dict(mutate=lambda t: t.__setitem__(HIDDEN_Q, torch.zeros(4, 4))), 422, "has shape [4, 4]"),
        ("wrong dtype", dict(mutate=lambda t: t.__setitem__(HIDDEN_Q, t[HIDDEN_Q].half())), 422, "has dtype F16"),
        ("NaN in the body", dict(mutate=nan), 422, "non-finite"),
        ("infinity in the head", dict(mutate=inf_in_head), 422, "non-finite"),
        ("no head", dict(head=False), 422, "no task head"),
        ("labels not of the task", dict(labels=("calm", "spam")), 422, "labels"),
        ("head does not fit the labels", dict(mutate=head_rows), 422, "output rows"),
        ("not a contribution", dict(meta={"format": "pt"}), 422, "format=potluck.contribution/1"),
        ("malformed metadata", dict(meta={"labels": "{not json"}), 422, "malformed contribution metadata"),
        ("bad example count", dict(n_examples=0), 422, "n_examples"),
    ]
    raw = [
        ("not safetensors", b"PK\x03\x04 a zip, or a pickle" * 10, 422, "not a valid safetensors file"),
        ("a huge header", struct.pack("<Q", 9 << 20) + b" " * (9 << 20), 413, "header is"),
        ("a header longer than the file", struct.pack("<Q", 1 << 40) + b"{}", 422, "more than the file holds"),
        ("too short", b"abc", 422, "shorter than"),
    ]
    before = set(c.store.list())
    for what, kwargs, status, reason in cases + raw:
        path = tmp_path / f"{what}.safetensors"
        if isinstance(kwargs, bytes):
            path.write_bytes(kwargs)
        else:
            make_contribution(c, path, **kwargs)
        err = refused(lambda path=path: acme.upload("/v1/tasks/acme-urgency/weights", path), status, reason)
        record = c.registry.contribution(err.contribution)
        assert record.status == "rejected" and record.reason == err.detail, what
        assert record.blob_sha is None, what
    assert set(c.store.list()) == before  # no byte of a rejected contribution is kept
    assert list(c.store.tmp.iterdir()) == []


def test_size_limits_and_transit_corruption(made, acme, tmp_path):
    c = made.commons
    good = make_contribution(c, tmp_path / "good.safetensors")
    c.settings.max_tensors = 10
    refused(lambda: acme.upload("/v1/tasks/acme-urgency/weights", good), 413, "over the limit of 10")
    c.settings.max_tensors = 4096
    c.settings.max_weights_mb = 1
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (3 << 20))
    refused(lambda: acme.upload("/v1/tasks/acme-urgency/weights", big), 413, "over the limit")
    headers = {"Content-Type": "application/octet-stream"}  # no Content-Length: caught while streaming
    chunks = iter([b"\0" * (1 << 19)] * 4)
    refused(lambda: acme.request("POST", "/v1/tasks/acme-urgency/weights", content=chunks, headers=headers),
            413, "larger than the limit")
    c.settings.max_weights_mb = 2048
    refused(lambda: acme.request("POST", "/v1/tasks/acme-urgency/weights", params={"sha256": "0" * 64},
                                 content=good.read_bytes(), headers=headers), 400, "corrupted in transit")
    refused(lambda: acme.request("POST", "/v1/tasks/acme-urgency/weights", content=b"", headers=headers),
            422, "empty")
    rejected = c.registry.contributions(status="rejected")
    assert len(rejected) == 5 and c.store.list() == sorted(set(c.store.list()))


def test_contributors_push_only_to_their_own_tasks(made, acme, tmp_path):
    globex = made.client(made.invite("globex"))
    path = make_contribution(made.commons, tmp_path / "c.safetensors")
    refused(lambda: globex.upload("/v1/tasks/acme-urgency/weights", path), 403, "belongs to acme")
    refused(lambda: globex.upload("/v1/tasks/no-such-task/weights", path), 404, "no task named")
    assert made.commons.registry.contributions() == []


def test_shared_datasets_are_checked_split_and_queued(made, acme, tmp_path):
    texts, labels = toy_texts(100)
    result = acme.share(write_csv(tmp_path / "tickets.csv", texts, labels), "helpdesk-topic")
    c, job = result["contribution"], result["job"]
    assert c["status"] == "accepted" and c["n_examples"] + c["n_eval"] == 100 and c["n_eval"] == 20
    assert job["status"] == "queued" and job["dataset"] == c["id"]
    train = made.commons.store.read_bytes(c["blob_sha"]).decode().splitlines()
    held = made.commons.store.read_bytes(c["eval_sha"]).decode().splitlines()
    assert len(train) == 80 and len(held) == 20 and not set(train) & set(held)
    assert {json.loads(line)["label"] for line in held} == {"calm", "urgent"}
    only_eval = acme.share(write_csv(tmp_path / "eval.csv", texts, labels), "helpdesk-topic", eval_only=True)
    assert only_eval["job"] is None and only_eval["contribution"]["eval_only"]
    assert only_eval["contribution"]["blob_sha"] is None and only_eval["contribution"]["n_eval"] == 100


def test_bad_datasets_are_rejected_with_the_line(made, acme, tmp_path):
    texts, labels = toy_texts(20)
    rows = [json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels, strict=True)]
    cases = [
        ("one class", [json.dumps({"text": t, "label": "calm"}) for t in texts], "only one class"),
        ("unknown label", rows + [json.dumps({"text": "x", "label": "spam"})], "not labels of task"),
        ("malformed line", rows[:2] + ["{oops"] + rows[2:], "dataset:3:2: malformed JSON"),
        ("empty text", rows + [json.dumps({"text": " ", "label": "calm"})], "empty text"),
    ]
    for what, lines, reason in cases:
        path = tmp_path / f"{what}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        err = refused(lambda path=path: acme.upload("/v1/tasks/acme-urgency/datasets", path), 422, reason)
        assert made.commons.registry.contribution(err.contribution).reason == err.detail
    assert made.commons.registry.jobs() == []
    bad = write_csv(tmp_path / "bad.csv", texts, labels, columns=("body", "label"))
    with pytest.raises(UserError, match="no text column 'text'"):  # checked at home first, like finetune
        acme.share(bad, "acme-urgency")


def test_pull_writes_a_folder_finetune_takes_and_checks_every_file(made, tmp_path):
    from potluck.encoders import load_for_classification

    reader = made.client(made.invite("viewer", "reader"))
    info = reader.pull(tmp_path / "base")
    marker = json.loads((tmp_path / "base" / "commons.json").read_text())
    assert marker["base_version"] == 0 and marker["weights_sha256"] == info["weights_sha"]
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["potluck_commons"] == marker
    model = load_for_classification(tmp_path / "base", ["calm", "urgent"])
    assert model.config.potluck_commons["base_version"] == 0
    path = made.commons.store.path(info["weights_sha"])
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")  # the disk corrupts the stored base
    refused(lambda: reader.pull(tmp_path / "again"), 500, "corrupted on disk")
    assert not (tmp_path / "again").exists()
    refused(lambda: reader.pull(tmp_path / "v9", version=9), 404, "no base version 9")


def test_openapi_documents_the_v1_routes(made):
    spec = made.client(None).get("/openapi.json")
    assert {"/v1/bases/{version}", "/v1/tasks/{task}/weights", "/v1/tasks/{task}/datasets", "/v1/jobs/lease",
            "/v1/jobs/{job_id}/heartbeat", "/v1/jobs/{job_id}/result", "/v1/status"} <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_the_fast_finite_check_is_exact():
    from potluck.commons.checks import _norm

    x = torch.randn(1000)
    assert math.isclose(_norm(x), float(x.norm()), rel_tol=1e-5)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[500] = bad
        assert math.isnan(_norm(y))
    huge = torch.full((10,), 1e30)  # finite, but its square overflows float32
    assert math.isclose(_norm(huge), 1e30 * math.sqrt(10), rel_tol=1e-6)
