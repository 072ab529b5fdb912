"""Fusion rounds on the commons: too few contributions, honest rounds, poisoners, serving every task, lineage.

Tiny encoders over the API (FastAPI TestClient); contributions are the stored base plus noise (honest) or
scaled / sign-flipped (poisoned), pushed like any contribution (finite values and matching shapes pass the
weights checks by design: the gate and the robust fusion methods are the defence).
"""

import pytest
import torch
from commons_helpers import BACKENDS, live_server, make_commons, make_contribution, write_csv
from helpers import toy_texts
from safetensors.torch import load_file

from potluck.commons.client import CommonsRequestError

TASK = "acme-urgency"
TOPIC_WORDS = {"billing": "invoice billing plan card refund payment".split(),
               "account": "login password email address locked account".split(),
               "animals": "cat dog weather paris london green".split()}


@pytest.fixture
def sqlite_made(tmp_path, tiny_encoder):
    m = make_commons(tmp_path / "commons", tiny_encoder, None)
    yield m
    m.close()


def setup_commons(m, tmp_path, *, share: bool = True):
    """An admin client and a contributor ('acme') that owns TASK, with toy data shared for it."""
    admin, acme = m.client(m.admin), m.client(m.invite("acme"))
    acme.ensure_task(TASK, ["calm", "urgent"])
    if share:
        texts, labels = toy_texts(160, seed=3)
        acme.share(write_csv(tmp_path / "toy.csv", texts, labels), TASK)
    return admin, acme


def push(m, client, tmp_path, name: str, task: str = TASK, labels=("calm", "urgent"), **kwargs) -> dict:
    path = make_contribution(m.commons, tmp_path / f"{name}.safetensors", task=task, labels=labels, **kwargs)
    return client.upload(f"/v1/tasks/{task}/weights", path)


def scaled(factor: float):
    def mutate(tensors):
        for k, v in tensors.items():
            if v.is_floating_point() and not k.startswith("head."):
                tensors[k] = v * factor
    return mutate


def follows_the_gate_rule(outcome: dict) -> bool:
    """promote iff mean(candidate) >= mean(current) and no task falls by more than the margin."""
    falls = [s["current"] - s["candidate"] for s in outcome["scores"].values()]
    rule = outcome["mean_candidate"] >= outcome["mean_current"] - 1e-9 and max(falls) <= outcome["margin"] + 1e-9
    return (outcome["outcome"] == "promoted") == rule


def test_a_round_with_too_few_contributions_does_nothing_and_says_why(sqlite_made, tmp_path):
    m = sqlite_made
    admin, acme = setup_commons(m, tmp_path, share=False)
    ids = [push(m, acme, tmp_path, f"c{i}", seed=i)["id"] for i in range(2)]
    out = admin.round(min_contributions=3)
    assert out["outcome"] == "skipped" and out["contributions"] == ids
    assert "not enough contributions: 2" in out["reason"] and "at least 3" in out["reason"]
    push(m, acme, tmp_path, "c2", seed=2)
    out = admin.round(min_contributions=3)  # enough weights now, but nothing to judge a candidate by
    assert out["outcome"] == "skipped" and "no task has evaluation data" in out["reason"]
    assert [b.version for b in m.commons.registry.bases()] == [0]
    assert all(c["fused_into"] is None for c in admin.get("/v1/contributions", params={"kind": "weights"}))
    with pytest.raises(CommonsRequestError) as err:
        acme.round()
    assert err.value.status == 403
    with pytest.raises(CommonsRequestError) as err:
        admin.round(method="average")
    assert err.value.status == 400 and "unknown fusion method" in err.value.detail
    with pytest.raises(CommonsRequestError) as err:
        admin.round(methd="mean")
    assert err.value.status == 422


@pytest.mark.parametrize("db_url", BACKENDS, indirect=True)
def test_an_honest_round_is_decided_by_the_gate_and_recorded(tmp_path, tiny_encoder, db_url):
    m = make_commons(tmp_path / "commons", tiny_encoder, db_url)
    try:
        admin, acme = setup_commons(m, tmp_path)
        ids = [push(m, acme, tmp_path, f"c{i}", seed=i, noise=1e-3)["id"] for i in range(3)]
        out = admin.round(method="mean", min_contributions=3)
        assert out["outcome"] in ("promoted", "rejected") and follows_the_gate_rule(out)
        assert out["candidate_version"] == 1 and out["parent"] == 0 and sorted(out["contributions"]) == ids
        assert set(out["scores"]) == {TASK} and 0 <= out["scores"][TASK]["candidate"] <= 1
        bases = {b["version"]: b for b in admin.status()["bases"]}
        candidate = bases[1]
        assert candidate["status"] == out["outcome"] and candidate["parent"] == 0
        assert candidate["method"] == "fusion:mean" and candidate["lineage"]["contributions"] == sorted(ids)
        assert candidate["lineage"]["gate"]["reason"] == out["reason"]
        assert candidate["lineage"]["scores"][TASK] == out["scores"][TASK]["candidate"]
        assert bases[0]["lineage"]["scores"][TASK] == out["scores"][TASK]["current"]
        fused = {c["id"]: c["fused_into"] for c in admin.get("/v1/contributions", params={"kind": "weights"})}
        if out["outcome"] == "promoted":
            assert fused == dict.fromkeys(ids, 1) and out["released"] == []
            again = admin.round(min_contributions=1)  # they are used up: a second round has nothing to fuse
            assert again["outcome"] == "skipped" and "not enough contributions: 0" in again["reason"]
        else:  # a rejected round gives them back (test_commons_safety.py follows both verdicts through)
            assert fused == dict.fromkeys(ids) and sorted(out["released"]) == ids
    finally:
        m.close()


def test_a_poisoned_contribution_makes_the_gate_reject_a_plain_mean(sqlite_made, tmp_path):
    m = sqlite_made
    admin, acme = setup_commons(m, tmp_path)
    for i in range(3):
        push(m, acme, tmp_path, f"honest{i}", seed=i)
    poison = push(m, acme, tmp_path, "poison", seed=9, mutate=scaled(100.0))
    assert poison["status"] == "accepted"  # finite and the right shapes: accepted by design
    out = admin.round(method="mean")
    assert out["outcome"] == "rejected" and follows_the_gate_rule(out)
    assert out["scores"][TASK]["candidate"] < out["scores"][TASK]["current"] - 0.02
    assert "rejected:" in out["reason"]
    assert m.commons.registry.current_base().version == 0  # nothing promoted
    record = m.commons.registry.base(out["candidate_version"])
    assert record.status == "rejected" and record.lineage["decision"] == out["reason"]
    norms = {i["contribution"]: i["task_vector_norm"] for i in record.lineage["inputs"]}
    assert norms[poison["id"]] > 10 * max(v for k, v in norms.items() if k != poison["id"])


@pytest.mark.parametrize("method,factor", [("median", 100.0), ("trimmed-mean", -1.0)])
def test_a_poisoner_is_outvoted_by_robust_fusion(sqlite_made, tmp_path, method, factor):
    m = sqlite_made
    admin, acme = setup_commons(m, tmp_path)
    for i in range(3):
        push(m, acme, tmp_path, f"honest{i}", seed=i, noise=1e-3)
    push(m, acme, tmp_path, "poison", seed=9, mutate=scaled(factor))
    out = admin.round(method=method)
    assert follows_the_gate_rule(out)
    base = load_file(m.commons.store.path(m.commons.registry.base(0).weights_sha))
    fused = load_file(m.commons.store.path(m.commons.registry.base(out["candidate_version"]).weights_sha))
    worst = max(float((fused[k].float() - v.float()).abs().max()) for k, v in base.items() if v.is_floating_point())
    assert worst < 0.01  # the honest noise is 1e-3 per coordinate; the poisoner moved every weight by >= 1x
    assert out["scores"][TASK]["candidate"] >= out["scores"][TASK]["current"] - 0.02


def test_every_task_is_served_after_a_promotion_and_earlier_bases_can_be_pulled(sqlite_made, tmp_path):
    m = sqlite_made
    admin, acme = setup_commons(m, tmp_path)
    texts = [" ".join(words[i % 6] for i in range(k, k + 4)) for words in TOPIC_WORDS.values() for k in range(30)]
    labels = [label for label in TOPIC_WORDS for _ in range(30)]
    acme.share(write_csv(tmp_path / "topics.csv", texts, labels), "topics")
    acme.ensure_task("pushed-only", ["no", "yes"])
    pushed = push(m, acme, tmp_path, "pushed", task="pushed-only", labels=("no", "yes"), seed=5)
    for i in range(3):  # identical to the base: the candidate scores exactly as the base does
        push(m, acme, tmp_path, f"same{i}", seed=i, noise=0.0)
    out = admin.round(method="median")
    assert out["outcome"] == "promoted", out["reason"]
    assert {h["task"] for h in out["heads"]} == {TASK, "topics"}
    assert m.commons.registry.current_base().version == out["candidate_version"] == 1
    reader = m.client(m.invite("rita", "reader"))
    for task, labels in ((TASK, {"calm", "urgent"}), ("topics", set(TOPIC_WORDS)), ("pushed-only", {"no", "yes"})):
        one = reader.predict(task, "server down customers cannot pay")
        assert {p["label"] for p in one} == labels and abs(sum(p["score"] for p in one) - 1) < 1e-4
        assert [p["score"] for p in one] == sorted((p["score"] for p in one), reverse=True)
        batch = reader.predict(task, ["thanks great question", "login password locked"])
        assert len(batch) == 2 and all({p["label"] for p in row} == labels for row in batch)
    response = reader.request("POST", f"/v1/tasks/{TASK}/predict", json={"inputs": "site down now"})
    assert response.headers["x-potluck-head"] == "refit" and response.headers["x-potluck-base-version"] == "1"
    response = reader.request("POST", "/v1/tasks/pushed-only/predict", json={"inputs": "hello"})
    assert response.headers["x-potluck-head"] == "contribution" and pushed["status"] == "accepted"
    # curl -d sends a form Content-Type (or none): the body is read as JSON all the same, as `potluck serve` does
    raw = reader.http.post(f"/v1/tasks/{TASK}/predict", content=b'{"inputs": "site down"}',
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert raw.status_code == 200 and {p["label"] for p in raw.json()} == {"calm", "urgent"}
    for body, status, words in ((b'{"inputs": ', 400, "malformed JSON"), (b'{"inputs": 5}', 422, "inputs"),
                                (b"", 400, "empty request body")):
        bad = reader.http.post(f"/v1/tasks/{TASK}/predict", content=body)
        assert bad.status_code == status and words in bad.json()["detail"] and "\n" not in bad.json()["detail"]
    # No check of which label wins: a refit head on this tiny random encoder's pooler features gives logits
    # of ~1e-4, inside bf16 rounding (served precision 'auto'), so the winner there is noise, not a result.
    with pytest.raises(CommonsRequestError) as err:
        reader.predict("no-such-task", "x")
    assert err.value.status == 404
    old, new = reader.pull(tmp_path / "v0", version=0), reader.pull(tmp_path / "v1")
    assert old["version"] == 0 and new["version"] == 1 and new["parent"] == 0
    assert new["lineage"]["method"] == "median" and new["lineage"]["gate"]["promote"] is True
    from potluck.commons.store import sha256_file

    assert sha256_file(tmp_path / "v0" / "model.safetensors") == m.commons.registry.base(0).weights_sha
    assert sha256_file(tmp_path / "v1" / "model.safetensors") == m.commons.registry.base(1).weights_sha
    v0, v1 = load_file(tmp_path / "v0" / "model.safetensors"), load_file(tmp_path / "v1" / "model.safetensors")
    assert all(torch.equal(v0[k], v1[k]) for k in v0)  # the median of copies of the base is the base


@pytest.mark.timeout(300)
def test_the_round_and_status_commands_over_http(sqlite_made, tmp_path):
    from typer.testing import CliRunner

    from potluck.cli import app

    m = sqlite_made
    admin, acme = setup_commons(m, tmp_path)
    for i in range(3):
        push(m, acme, tmp_path, f"honest{i}", seed=i)
    push(m, acme, tmp_path, "poison", seed=9, mutate=scaled(100.0))

    def cli(*args: str) -> str:
        result = CliRunner().invoke(app, list(args), env={"POTLUCK_TOKEN": m.admin, "COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        return result.output

    with live_server(m.commons.root, None) as (url, _):
        assert "no round: not enough contributions: 4" in cli("commons", "round", url, "--min-contributions", "5")
        shown = cli("commons", "round", url, "--method", "mean")
        assert "candidate base version 1 rejected:" in shown and TASK in shown
        status = cli("commons", "status", url)
        assert "fusion:mean" in status and "rejected:" in status


def test_a_candidate_the_gate_cannot_score_is_rejected_and_its_contributions_released(sqlite_made, tmp_path):
    m = sqlite_made
    admin, acme = setup_commons(m, tmp_path)
    ids = [push(m, acme, tmp_path, f"honest{i}", seed=i)["id"] for i in range(2)]
    ids.append(push(m, acme, tmp_path, "huge", seed=9, mutate=scaled(1e30))["id"])  # finite, so accepted
    out = admin.round(method="mean")
    assert out["outcome"] == "rejected" and "the gate could not score the candidate" in out["reason"]
    assert m.commons.registry.base(out["candidate_version"]).status == "rejected"
    assert m.commons.registry.current_base().version == 0
    fused = {c["id"]: c["fused_into"] for c in admin.get("/v1/contributions", params={"kind": "weights"})}
    assert fused == dict.fromkeys(ids)  # released: a robust round can use them
    out = admin.round(method="median")
    assert out["outcome"] in ("promoted", "rejected") and out["scores"]
