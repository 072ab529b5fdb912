"""Nothing lost, nothing silently wrong in the commons: only the head the base implies is accepted under
`head.`, a rejected round gives its contributions back, a rejected candidate base is never pulled without a
word, and every rejected push is in `status` without leaving an unexplained task behind."""

import json
import logging

import pytest
import torch
from commons_helpers import make_commons, make_contribution, write_csv
from helpers import toy_texts
from safetensors.torch import load_file, save_file

from potluck.commons.client import CommonsRequestError
from potluck.errors import UserError

TASK = "acme-urgency"


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
    client.ensure_task(TASK, ["calm", "urgent"])
    return client


def hidden_size(commons) -> int:
    return commons.registry.base(0).spec["embeddings.word_embeddings.weight"][1][1]


def model_folder(commons, folder, labels=("calm", "urgent"), *, body: bool = True, extra: dict | None = None):
    """A model folder as `potluck finetune --base <pulled base 0>` writes it (BertForSequenceClassification names)."""
    base = commons.registry.base(0)
    tensors = {"bert." + k: v for k, v in load_file(commons.store.path(base.weights_sha)).items()} if body else {}
    tensors["classifier.weight"] = 0.02 * torch.randn(len(labels), hidden_size(commons))
    tensors["classifier.bias"] = torch.zeros(len(labels))
    tensors.update(extra or {})
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    marker = {"url": "http://testserver", "base_version": 0, "weights_sha256": base.weights_sha}
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "potluck_commons": marker,
                                                    "id2label": {str(i): y for i, y in enumerate(labels)}}))
    (folder / "potluck.json").write_text(json.dumps({"data": {"n_train": 40}, "metrics": {"valid": {"macro_f1": 0.8}}}))
    return folder


# -- 1. only the expected head under `head.` ------------------------------------------------------

def test_only_the_head_the_base_implies_is_accepted_under_head(made, acme, tmp_path):
    c, hidden = made.commons, hidden_size(made.commons)
    expected = "a 2-label head on base version 0 has exactly 'head.classifier.bias', 'head.classifier.weight'"
    cases = [  # (what, how to break it, the reason must say)
        ("an extra tensor", lambda t: t.__setitem__("head.backdoor.weight", torch.zeros(2, hidden)),
         f"unexpected head tensor(s) 'head.backdoor.weight': {expected}"),
        ("an extra tensor with one row per label", lambda t: t.__setitem__("head.payload", torch.zeros(2)),
         "unexpected head tensor(s) 'head.payload'"),
        ("a missing bias", lambda t: t.pop("head.classifier.bias"), "missing head tensor(s) 'head.classifier.bias'"),
        ("a wider weight", lambda t: t.__setitem__("head.classifier.weight", torch.zeros(2, hidden + 1)),
         f"head tensor 'head.classifier.weight' has shape [2, {hidden + 1}], but a head with 2 output rows"),
    ]
    before = set(c.store.list())
    for what, mutate, reason in cases:
        path = make_contribution(c, tmp_path / f"{what}.safetensors", mutate=mutate)
        err = refused(lambda path=path: acme.upload(f"/v1/tasks/{TASK}/weights", path), 422, reason)
        assert "\n" not in err.detail, what
        record = c.registry.contribution(err.contribution)
        assert record.status == "rejected" and record.reason == err.detail and record.blob_sha is None, what
    assert set(c.store.list()) == before and c.registry.task_heads(TASK) == []  # nothing of them kept
    ok = acme.upload(f"/v1/tasks/{TASK}/weights", make_contribution(c, tmp_path / "ok.safetensors"))
    assert ok["status"] == "accepted" and c.registry.contributions(status="accepted")[0]["use"] == "available"


def test_the_expected_head_follows_the_architecture():
    from transformers import AutoModel, RobertaConfig

    from potluck.commons.formats import head_spec

    config = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32)
    with torch.device("meta"):
        body = set(AutoModel.from_config(config).state_dict())
    assert head_spec(config.to_dict(), 3, body) == {
        "head.classifier.dense.weight": [16, 16], "head.classifier.dense.bias": [16],
        "head.classifier.out_proj.weight": [3, 16], "head.classifier.out_proj.bias": [3]}


# -- 2. a rejected round gives its contributions back ---------------------------------------------

def test_only_a_promoted_round_uses_contributions_up(made, acme, tmp_path):
    from potluck.commons.rounds import available, claim, release

    c = made.commons
    ids = [acme.upload(f"/v1/tasks/{TASK}/weights", make_contribution(c, tmp_path / f"c{i}.safetensors", seed=i))["id"]
           for i in range(2)]
    v0 = c.registry.base(0)

    def candidate() -> int:
        return c.registry.add_base(manifest_sha=v0.manifest_sha, weights_sha=v0.weights_sha, spec=v0.spec,
                                   method="fusion:mean", parent=0, status="candidate").version

    def uses() -> dict:
        return {x["id"]: x["use"] for x in c.registry.contributions(kind="weights")}

    assert uses() == dict.fromkeys(ids, "available") and [x["id"] for x in available(c, 0)] == ids
    first = candidate()
    assert claim(c, first, ids) == 2 and uses() == dict.fromkeys(ids, "in round")
    assert available(c, 0) == [] and claim(c, candidate(), ids) == 0  # a running round holds them
    c.registry.set_base_status(first, "rejected")  # stopped before its release (or rejected before releases existed)
    assert [x["id"] for x in available(c, 0)] == ids and uses() == dict.fromkeys(ids, "available")
    second = candidate()
    assert claim(c, second, ids) == 2  # taken back from the rejected candidate
    c.registry.set_base_status(second, "rejected")
    assert release(c, second, available(c, 0)) == ids
    assert {x["id"]: x["fused_into"] for x in c.registry.contributions(kind="weights")} == dict.fromkeys(ids)
    assert c.registry.base(second).lineage["released"] == ids
    third = candidate()
    assert claim(c, third, ids) == 2
    c.registry.set_base_status(third, "promoted")
    assert uses() == dict.fromkeys(ids, "used") and available(c, third) == [] and available(c, 0) == []
    late = acme.upload(f"/v1/tasks/{TASK}/weights", make_contribution(c, tmp_path / "late.safetensors", seed=7))
    assert uses()[late["id"]] == "stale"  # on base 0, no longer the current base: no round fuses it


def test_a_rejected_round_leaves_its_contributions_to_the_next(tmp_path, tiny_encoder):
    m = make_commons(tmp_path / "commons", tiny_encoder, None)
    try:
        admin, acme = m.client(m.admin), m.client(m.invite("acme"))
        acme.share(write_csv(tmp_path / "toy.csv", *toy_texts(160, seed=3)), TASK)

        def poison(tensors):
            for k, v in tensors.items():
                if v.is_floating_point() and not k.startswith("head."):
                    tensors[k] = v * 100.0

        ids = [acme.upload(f"/v1/tasks/{TASK}/weights", make_contribution(
            m.commons, tmp_path / f"c{i}.safetensors", seed=i, noise=0.0, mutate=poison if i == 3 else None))["id"]
            for i in range(4)]  # three copies of the base and a poisoner
        out = admin.round(method="mean")
        assert out["outcome"] == "rejected" and out["released"] == ids
        weights = admin.get("/v1/contributions", params={"kind": "weights"})
        assert {x["id"]: (x["status"], x["fused_into"], x["use"]) for x in weights} == \
            dict.fromkeys(ids, ("accepted", None, "available"))
        assert m.commons.registry.base(out["candidate_version"]).lineage["released"] == ids
        out = admin.round(method="median")  # the same contributions, a robust method: the poisoner is outvoted
        assert out["outcome"] == "promoted" and out["contributions"] == ids and out["released"] == []
        weights = admin.get("/v1/contributions", params={"kind": "weights"})
        assert {x["id"]: (x["fused_into"], x["use"]) for x in weights} == dict.fromkeys(ids, (out["candidate_version"],
                                                                                                "used"))
        again = admin.round(min_contributions=1)
        assert again["outcome"] == "skipped" and "not enough contributions: 0" in again["reason"]
    finally:
        m.close()


# -- 3. a rejected candidate is never pulled without a word ---------------------------------------

def test_pulling_a_rejected_candidate_warns_and_says_so(made, tmp_path, caplog):
    c = made.commons
    v0 = c.registry.base(0)
    for _ in range(2):  # version 1 stays a candidate, version 2 is rejected
        c.registry.add_base(manifest_sha=v0.manifest_sha, weights_sha=v0.weights_sha, spec=v0.spec,
                            method="fusion:mean", parent=0, status="candidate")
    c.registry.set_base_status(2, "rejected", {"decision": "rejected: macro-F1 fell by 0.200"})
    reader = made.client(made.invite("viewer", "reader"))
    warned = lambda: [r.getMessage() for r in caplog.records if r.name == "potluck.commons.client"]  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="potluck.commons.client"):
        info = reader.pull(tmp_path / "v2", version=2)
        assert info["rejected"] is True and info["status"] == "rejected"
        assert "the gate rejected" in info["warning"] and "macro-F1 fell by 0.200" in info["warning"]
        assert warned() == [info["warning"]] and "\n" not in info["warning"]
        assert (tmp_path / "v2" / "model.safetensors").is_file()  # still pulled, for inspection
        caplog.clear()
        pending = reader.pull(tmp_path / "v1", version=1)
        assert pending["rejected"] is False and "not judged yet" in pending["warning"] and warned()
        caplog.clear()
        current = reader.pull(tmp_path / "v0")
        assert current["rejected"] is False and "warning" not in current and warned() == []
    listed = {b["version"]: b["rejected"] for b in reader.get("/v1/bases")}
    assert listed == {0: False, 1: False, 2: True}


# -- 4. every rejected push is in status, and leaves no unexplained task ----------------------------

def test_a_push_refused_at_home_creates_no_task(made, tmp_path):
    acme = made.client(made.invite("acme"))
    with pytest.raises(UserError, match="does not have the base's tensor"):
        acme.push(model_folder(made.commons, tmp_path / "headless", body=False), "fresh-task")
    refused(lambda: acme.get("/v1/tasks/fresh-task"), 404, "no task named")
    assert made.commons.registry.contributions() == []


def test_a_rejected_push_is_in_status_and_its_task_is_marked(made, tmp_path):
    acme = made.client(made.invite("acme"))
    bad = model_folder(made.commons, tmp_path / "bad", extra={"classifier.backdoor": torch.zeros(4)})
    err = refused(lambda: acme.push(bad, "fresh-task"), 422, "unexpected head tensor(s) 'head.classifier.backdoor'")
    status = acme.status()
    task = next(t for t in status["tasks"] if t["name"] == "fresh-task")
    assert (task["state"], task["contributions"], task["rejected"]) == ("rejected only", 0, 1)
    assert status["rejections"]["count"] == 1
    [shown] = status["rejections"]["recent"]
    assert (shown["id"], shown["reason"], shown["task_name"], shown["contributor_name"]) == \
        (err.contribution, err.detail, "fresh-task", "acme")
    good = model_folder(made.commons, tmp_path / "good", labels=("low", "high"))  # fixed, and other labels
    record = acme.push(good, "fresh-task")
    assert record["status"] == "accepted"
    task = next(t for t in acme.status()["tasks"] if t["name"] == "fresh-task")
    assert (task["state"], task["contributions"], task["rejected"], task["labels"]) == ("active", 1, 1, ["low", "high"])
    for i in range(2):
        acme.push(model_folder(made.commons, tmp_path / f"more{i}", labels=("low", "high")), "fresh-task")
    status = made.commons.registry.status(recent=2)  # accepted ones never crowd a rejection out
    assert all(x["status"] == "accepted" for x in status["contributions"])
    assert [x["id"] for x in status["rejections"]["recent"]] == [err.contribution]
