"""The network effect, measured: fusion rounds on a commons started from MiniLM, and a poisoner.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/commons_rounds.py            # scaled (~20 min, 2 cores)
    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/commons_rounds.py --full     # the issue's version (hours)
    .venv/bin/python benchmarks/commons_rounds.py --quick                                # a smoke run

A commons (in-process, over its real HTTP API with FastAPI's TestClient) starts from the embedded MiniLM.
Contributors: one per dataset in ../shared/data but the two held out as new tasks (--new-tasks, default
trec and subj). Each shares --eval-size examples of its test split as --eval-only data (the gate trains
its head on half and scores on the other half). In each of --rounds rounds every contributor pulls the
current base, fine-tunes it (TextClassifier, --epochs, on a fresh stratified sample of --train-size of
its train split) and pushes the weights; the admin runs a round (--method); the gate decides.

Measured after each round, on the current base against MiniLM (the anchor) in this run:
  - contributors' tasks: the gate's frozen-encoder macro-F1 (its own scores, every round);
  - new tasks: frozen-encoder macro-F1 (logistic regression on --new-labels labels, scored on
    --new-test test examples), and --ft-seeds seeds of fine-tuning on --new-labels labels
    (--ft-epochs) from MiniLM and from the last base (--ft-all-bases: every base).
Poisoner: a fresh commons, round 1's models of all but the last contributor plus the last one's with its
encoder body scaled by --poison-scale; one round per --poison-methods method; what the gate decides.
Everything goes to benchmarks/results/<host kind>/commons_rounds.json (+ .png), sizes and budgets included.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, load_split, results_dir, stratified_sample, write_result  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tasks", default="trec,subj")
    p.add_argument("--contributors", default=None, help="datasets (default: all but the new tasks)")
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--method", default="mean")
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--new-labels", type=int, default=500)
    p.add_argument("--new-test", type=int, default=1000)
    p.add_argument("--ft-seeds", type=int, default=1)
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-all-bases", action="store_true")
    p.add_argument("--poison-methods", default="mean,median")
    p.add_argument("--poison-scale", type=float, default=100.0)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=None,
                   help="fine-tuning learning rate for everyone (default: Potluck's own, as a user gets it)")
    p.add_argument("--base", default="minilm", help="the commons' v0 and the anchor (a folder for smoke runs)")
    p.add_argument("--work", type=Path, default=Path("/tmp/potluck-commons-rounds"))
    p.add_argument("--name", default="commons_rounds")
    p.add_argument("--full", action="store_true", help="the issue's version: 2000 examples, 3 rounds, 3 seeds")
    p.add_argument("--quick", action="store_true", help="a smoke run (tiny sizes, one round)")
    args = p.parse_args()
    if args.full:
        args.train_size, args.rounds, args.ft_seeds, args.ft_epochs, args.ft_all_bases = 2000, 3, 3, 3, True
        args.poison_methods = "mean,trimmed-mean,median"
    if args.quick:
        args.train_size, args.rounds, args.eval_size, args.new_labels, args.new_test = 48, 1, 120, 60, 100
        args.ft_seeds, args.poison_methods, args.name = 1, "mean", "commons_rounds-quick"
        args.contributors = args.contributors or "sms_spam,sst2_sentences,airline_sentiment"
    new = args.new_tasks.split(",")
    args.contributor_list = args.contributors.split(",") if args.contributors else [d for d in DATASETS if d not in new]
    args.new_list = new
    return args


class Bench:
    """One commons, its admin and one client per contributor, all over TestClient."""

    def __init__(self, root: Path, contributors: list[str], eval_slices: dict, base: str = "minilm"):
        from fastapi.testclient import TestClient

        from potluck.commons.api import create_app
        from potluck.commons.client import CommonsClient
        from potluck.commons.service import Commons

        self.commons, token = Commons.create(root, base=base)
        app = create_app(self.commons)

        def client(token: str) -> CommonsClient:  # one TestClient each: a client sets its token on its http
            return CommonsClient("http://testserver", token, http=TestClient(app, base_url="http://testserver"))

        self.admin = client(token)
        self.clients = {}
        for name in contributors:
            task = name.replace("_", "-")
            c = client(self.admin.invite(task)["token"])
            texts, labels = eval_slices[name]
            c.ensure_task(task, sorted(set(load_split(name, "train")[1]) | set(labels)))
            path = root.parent / f"{root.name}-{name}-eval.jsonl"
            path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)))
            c.share(path, task, eval_only=True)
            self.clients[name] = c

    def push(self, name: str, folder: Path) -> dict:
        return self.clients[name].push(folder, name.replace("_", "-"))


def lr(args) -> dict:
    """--learning-rate for body and head alike, or nothing: Potluck's defaults (body and new head apart)."""
    return {} if args.learning_rate is None else {"learning_rate": args.learning_rate, "head_learning_rate": 0}


def learning_rates(args) -> dict:
    if args.learning_rate is not None:
        return {"learning_rate": args.learning_rate, "head_learning_rate": "the same"}
    from potluck.finetune import FinetuneSettings

    s = FinetuneSettings()
    return {"learning_rate": s.learning_rate, "head_learning_rate": s.head_learning_rate, "source": "Potluck defaults"}


def finetune_contributor(base: Path, name: str, out: Path, args, seed: int) -> dict:
    from potluck.classifier import TextClassifier

    texts, labels = stratified_sample(*load_split(name, "train"), args.train_size, seed)
    start = time.perf_counter()
    clf = TextClassifier(str(base), epochs=args.epochs, patience=args.epochs, max_length=args.max_length,
                         batch_size=16, seed=seed, **lr(args))
    clf.fit(texts, labels).save(out)
    return {"seconds": round(time.perf_counter() - start, 1), "n": len(texts)}


def new_task_frozen(base: Path, data: dict, gate) -> dict:
    from potluck.commons.gate import score_base

    return {k: round(v, 4) for k, v in score_base(base, data, gate).items()}


def new_task_finetune(base: Path, args, new_data: dict, seeds: int) -> dict:
    from sklearn.metrics import f1_score

    from potluck.classifier import TextClassifier

    out = {}
    for task, (train, test) in new_data.items():
        runs = []
        for seed in range(seeds):
            texts, labels = stratified_sample(*train, args.new_labels, seed)
            clf = TextClassifier(str(base), epochs=args.ft_epochs, patience=args.ft_epochs, calibrate=False,
                                 max_length=args.max_length, batch_size=16, seed=seed, **lr(args))
            clf.fit(texts, labels)
            runs.append(float(f1_score(test[1], clf.predict(test[0]), average="macro")))
        out[task] = {"macro_f1": round(sum(runs) / len(runs), 4), "seeds": [round(r, 4) for r in runs]}
    return out


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    from potluck.commons.gate import GateSettings, TaskData
    from potluck.commons.rounds import base_folder

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    started = time.perf_counter()
    eval_slices = {n: stratified_sample(*load_split(n, "test"), args.eval_size, 1) for n in args.contributor_list}
    new_data = {}
    for n in args.new_list:
        train, test = load_split(n, "train"), stratified_sample(*load_split(n, "test"), args.new_test, 1)
        new_data[n] = (train, test)
    gate = GateSettings(max_length=args.max_length)
    frozen_tasks = {n: TaskData(*stratified_sample(*train, args.new_labels, 0), *test) for n, (train, test) in new_data.items()}

    bench = Bench(args.work / "commons", args.contributor_list, eval_slices, args.base)
    v0 = base_folder(bench.commons, 0)
    bases = [{"version": 0, "what": "MiniLM (anchor)", "new_tasks_frozen": new_task_frozen(v0, frozen_tasks, gate)}]
    finetuned: dict[int, dict] = {}  # fine-tuning runs last (the most expensive part), but for every base: first
    if args.ft_all_bases:  # the anchor first, so that a run cut short still compares with it
        finetuned[0] = new_task_finetune(v0, args, new_data, args.ft_seeds)
    poison: list[dict] = []
    rounds, first_models = [], {}
    for r in range(1, args.rounds + 1):
        current = bench.commons.registry.current_base().version
        pulled = args.work / f"pulled-v{current}-r{r}"
        bench.admin.pull(pulled)
        timing = {}
        for i, name in enumerate(args.contributor_list):
            folder = args.work / "models" / f"r{r}-{name}"
            timing[name] = finetune_contributor(pulled, name, folder, args, seed=100 * r + i)
            bench.push(name, folder)
            if r == 1:
                first_models[name] = folder
        t = time.perf_counter()
        out = bench.admin.round(method=args.method, min_contributions=len(args.contributor_list))
        entry = {"round": r, "parent": current, "finetune": timing, "round_seconds": round(time.perf_counter() - t, 1),
                 **{k: out.get(k) for k in ("outcome", "reason", "candidate_version", "scores", "mean_candidate",
                                            "mean_current")}}
        if out["outcome"] == "promoted":
            folder = base_folder(bench.commons, out["candidate_version"])
            bases.append({"version": out["candidate_version"], "what": f"round {r}",
                          "new_tasks_frozen": new_task_frozen(folder, frozen_tasks, gate)})
            if args.ft_all_bases:
                finetuned[out["candidate_version"]] = new_task_finetune(folder, args, new_data, args.ft_seeds)
        rounds.append(entry)
        print(f"round {r}: {out['outcome']} ({out.get('reason', '')})", flush=True)
        save(args, started, bases, finetuned, rounds, poison, partial=True)
        if r == 1:  # the poisoner replaces one of round 1's contributors, in fresh commons
            poison = poison_runs(args, eval_slices, first_models)
            save(args, started, bases, finetuned, rounds, poison, partial=True)
    last = bench.commons.registry.current_base().version
    for version in (0, last):
        if version not in finetuned:
            finetuned[version] = new_task_finetune(base_folder(bench.commons, version), args, new_data, args.ft_seeds)
            save(args, started, bases, finetuned, rounds, poison, partial=True)
    payload = save(args, started, bases, finetuned, rounds, poison, partial=False)
    print(json.dumps(payload["summary"], indent=2))


def save(args, started: float, bases, finetuned, rounds, poison, *, partial: bool) -> dict:
    """Write the results (and the picture) so far; `partial` says the run has not finished yet."""
    last = max((b["version"] for b in bases), default=0)
    payload = {
        "partial": partial,
        "what_ran": {
            "scale": "full" if args.full else "quick" if args.quick else "scaled-down", "base": args.base,
            "contributors": args.contributor_list, "new_tasks": args.new_list, "rounds": args.rounds,
            "contributor_finetune": {"examples": args.train_size, "epochs": args.epochs, "max_length": args.max_length,
                                     **learning_rates(args), "batch_size": 16},
            "fusion_method": args.method, "gate": "frozen-encoder logistic regression (mean pooling, max_length 128), "
            f"macro-F1, margin 0.02; data: {args.eval_size} eval-only test examples per contributor, split in half",
            "new_task_eval": {"labels": args.new_labels, "test_examples": args.new_test, "frozen": "every promoted base",
                              "finetune": {"seeds": args.ft_seeds, "epochs": args.ft_epochs,
                                           "bases": "every base" if args.ft_all_bases else "MiniLM and the last base"}},
            "poisoner": {"methods": args.poison_methods.split(","), "scale": args.poison_scale,
                         "who": f"{args.contributor_list[-1]}'s round-1 model, encoder body x {args.poison_scale}"},
            "not_run": [] if args.full else ["the issue's full sizes (2000 examples, 3 rounds, 3 seeds): use --full"]},
        "bases": bases, "new_tasks_finetuned": {str(k): v for k, v in finetuned.items()}, "rounds": rounds,
        "poisoner": poison, "summary": summarize(bases, finetuned, rounds, poison, last),
        "seconds": round(time.perf_counter() - started, 1)}
    path = write_result(args.name, payload)
    plot(payload, results_dir() / f"{args.name}.png")
    print(f"wrote {path}" + (" (partial)" if partial else ""), flush=True)
    return payload


def poison_runs(args, eval_slices: dict, models: dict) -> list[dict]:
    """Per method: a fresh commons, the honest round-1 models but one, and a poisoner; what the gate does."""
    from safetensors.torch import load_file, save_file

    honest, victim = args.contributor_list[:-1], args.contributor_list[-1]
    poisoned = args.work / "models" / f"poisoned-{victim}"
    shutil.copytree(models[victim], poisoned)
    tensors = load_file(poisoned / "model.safetensors")
    tensors = {k: v * args.poison_scale if v.is_floating_point() and not k.startswith("classifier.") else v
               for k, v in tensors.items()}
    save_file(tensors, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    out = []
    for method in args.poison_methods.split(","):
        bench = Bench(args.work / f"poison-{method}", args.contributor_list, eval_slices, args.base)
        for name in honest:
            bench.push(name, models[name])
        bench.push(victim, poisoned)
        t = time.perf_counter()
        result = bench.admin.round(method=method, min_contributions=len(args.contributor_list))
        norms = bench.commons.registry.base(result["candidate_version"]).lineage["inputs"]
        out.append({"method": method, "outcome": result["outcome"], "reason": result["reason"],
                    "scores": result["scores"], "mean_candidate": result["mean_candidate"],
                    "mean_current": result["mean_current"], "round_seconds": round(time.perf_counter() - t, 1),
                    "task_vector_norms": {i["task"]: round(i["task_vector_norm"], 4) for i in norms}})
        print(f"poisoner, {method}: {result['outcome']} ({result['reason']})", flush=True)
        bench.commons.registry.close()
        shutil.rmtree(args.work / f"poison-{method}", ignore_errors=True)
    return out


def summarize(bases, finetuned, rounds, poison, last) -> dict:
    anchor, final = bases[0]["new_tasks_frozen"], bases[-1]["new_tasks_frozen"]
    ft0, ftl = finetuned.get(0), finetuned.get(last)
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    ft_mean = lambda d: sum(v["macro_f1"] for v in d.values()) / len(d)  # noqa: E731
    return {
        "promoted_rounds": sum(r["outcome"] == "promoted" for r in rounds), "rounds": len(rounds),
        "final_base_version": last,
        "new_tasks_frozen_macro_f1": {"minilm": round(mean(anchor), 4), "final": round(mean(final), 4),
                                      "delta_points": round(100 * (mean(final) - mean(anchor)), 2),
                                      "ratio": round(mean(final) / mean(anchor), 4)},
        "new_tasks_finetuned_macro_f1": "not run yet" if not (ft0 and ftl) else {
            "minilm": round(ft_mean(ft0), 4), "final": round(ft_mean(ftl), 4),
            "delta_points": round(100 * (ft_mean(ftl) - ft_mean(ft0)), 2), "ratio": round(ft_mean(ftl) / ft_mean(ft0), 4)},
        "contributor_tasks_gate_macro_f1": [{"round": r["round"], "current": round(r["mean_current"], 4),
                                             "candidate": round(r["mean_candidate"], 4), "outcome": r["outcome"]}
                                            for r in rounds if r.get("mean_current") is not None],
        "poisoner": {p["method"]: {"outcome": p["outcome"],
                                   "delta_points": round(100 * (p["mean_candidate"] - p["mean_current"]), 2)}
                     for p in poison},
        "goal": "fused base beats MiniLM on the new tasks by >= 1 point; the poisoner changes nothing promoted",
    }


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rounds = payload["rounds"]
    xs = [0] + [r["round"] for r in rounds]
    if rounds:
        contributors = [rounds[0]["mean_current"]] + [r["mean_candidate"] for r in rounds]
        ax.plot(xs, contributors, "o-", label="contributors' tasks (gate score of each round's candidate)")
    for task in payload["what_ran"]["new_tasks"]:
        by_version = {b["version"]: b["new_tasks_frozen"][task] for b in payload["bases"]}
        ys, version = [by_version[0]], 0
        for r in rounds:
            version = r["candidate_version"] if r["outcome"] == "promoted" else version
            ys.append(by_version[version])
        ax.plot(xs, ys, "s--", label=f"new task {task} (frozen head, current base)")
    for p in payload["poisoner"]:
        ax.scatter([1], [p["mean_candidate"]], marker="x", s=60, label=f"round 1 with a poisoner, {p['method']} ({p['outcome']})")
    ax.set_xlabel("round (0 = MiniLM)")
    ax.set_ylabel("macro-F1")
    ax.set_xticks(xs)
    ax.set_title(f"Commons fusion rounds ({payload['what_ran']['scale']}, {payload['what_ran']['fusion_method']})")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
