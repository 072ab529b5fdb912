"""The commons: a shared service where organisations contribute datasets, compute and weights.

    potluck commons init --root commons/ --base minilm        # v0 of the shared base; prints the admin token once
    potluck commons serve --root commons/ --port 8700         # SQLite in commons/ by default, or --db postgresql://…
    potluck commons pull URL --out base/                      # then: potluck finetune --base base/ …
    potluck commons push URL --model models/acme-urgency --task acme-urgency

The parts: `store` (content-addressed blobs), `models` + `registry` + `jobs` (the records, SQLAlchemy),
`checks` (what a contribution must pass on arrival), `formats` (base bundles, contribution files),
`api` + `uploads` (the FastAPI service), `client` (what the CLI calls), `worker` (lending compute),
`auth` (tokens, roles, names), `service` (a commons on disk), `settings` (limits).
"""

__all__ = ["Commons", "CommonsClient", "CommonsSettings"]


def __getattr__(name: str):  # imported on first use: `potluck --help` need not load SQLAlchemy or httpx
    if name == "Commons":
        from potluck.commons.service import Commons
        return Commons
    if name == "CommonsClient":
        from potluck.commons.client import CommonsClient
        return CommonsClient
    if name == "CommonsSettings":
        from potluck.commons.settings import CommonsSettings
        return CommonsSettings
    raise AttributeError(name)
