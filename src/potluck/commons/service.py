"""A commons on disk: its root folder, blob store, registry and limits.

    commons, admin_token = Commons.create("commons/", base="minilm")   # v0 of the shared base
    commons = Commons.open("commons/", db_url="postgresql://…")          # SQLite in the root by default

The root holds `commons.json` (what this is), `blobs/` (the content-addressed store) and, with SQLite,
`commons.db`. With PostgreSQL the records live in that database and the blobs stay in the root.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from potluck.commons.formats import export_encoder, store_base_folder
from potluck.commons.registry import Registry, sqlite_url
from potluck.commons.settings import CommonsSettings
from potluck.commons.store import BlobStore
from potluck.errors import UserError
from potluck.fileio import atomic_write_json

logger = logging.getLogger(__name__)

ROOT_FORMAT = "potluck.commons/1"
DB_ENV = "POTLUCK_COMMONS_DB"


class Commons:
    """The store, the registry and the settings of one commons."""

    def __init__(self, root: str | os.PathLike, registry: Registry, settings: CommonsSettings | None = None):
        self.root = Path(root)
        self.store = BlobStore(self.root / "blobs")
        self.registry = registry
        self.settings = settings or CommonsSettings()

    @classmethod
    def open(cls, root: str | os.PathLike, db_url: str | None = None,
             settings: CommonsSettings | None = None) -> Commons:
        """Open an existing commons (made by `create`); `db_url` or $POTLUCK_COMMONS_DB for PostgreSQL."""
        root = Path(root)
        if not (root / "commons.json").is_file():
            raise UserError(f"{root} is not a commons (no commons.json)",
                            hint="create one with `potluck commons init --root ROOT`")
        return cls(root, connect(db_url or os.environ.get(DB_ENV) or sqlite_url(root)), settings)

    @classmethod
    def create(cls, root: str | os.PathLike, base: str = "minilm", db_url: str | None = None,
               admin: str = "admin") -> tuple[Commons, str]:
        """A new commons with `base` as version 0 and one admin; returns it and the admin's token."""
        root = Path(root)
        if (root / "commons.json").exists():
            raise UserError(f"{root} is already a commons", hint="pick another --root, or serve this one")
        if root.exists() and any(root.iterdir()):
            raise UserError(f"{root} exists and is not empty", hint="pick a new folder for --root")
        made_root = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        try:
            registry = connect(db_url or os.environ.get(DB_ENV) or sqlite_url(root))
        except UserError:
            if made_root:
                shutil.rmtree(root, ignore_errors=True)
            raise
        if registry.bases():
            raise UserError("that database already holds a commons", hint="use an empty database for --db")
        commons = cls(root, registry)
        work = Path(tempfile.mkdtemp(prefix=".base-", dir=root))
        try:
            export_encoder(base, work)
            manifest_sha, weights_sha, spec = store_base_folder(commons.store, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        who, token = registry.add_contributor(admin, "admin")
        registry.add_base(manifest_sha=manifest_sha, weights_sha=weights_sha, spec=spec,
                          method=f"init from {base}", lineage={"source": str(base)}, created_by=who.id)
        atomic_write_json(root / "commons.json", {
            "format": ROOT_FORMAT, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "database": "sqlite (commons.db)" if registry.engine.dialect.name == "sqlite" else "postgresql",
        })
        logger.info("created commons in %s with base %s (%d tensors)", root, base, len(spec))
        return commons, token

    def manifest(self, version: int | None = None) -> dict:
        from potluck.commons.formats import read_manifest

        return read_manifest(self.store.read_bytes(self.registry.base(version).manifest_sha))

    def describe(self) -> dict:
        return json.loads((self.root / "commons.json").read_text())


def connect(url: str) -> Registry:
    """The registry at `url` with its tables created; a UserError (one line) when it cannot be reached."""
    try:
        registry = Registry(url)
    except ModuleNotFoundError as err:
        raise UserError(f"no database driver for {url.split(':', 1)[0]} ({err.name} is not installed)",
                        hint="pip install 'potluck[postgres]'") from None
    except Exception as err:
        raise UserError(f"not a database URL: {url.split('@')[-1]} ({err})", hint="check --db") from None
    try:
        registry.create_schema()  # idempotent: tables added by a newer version appear
    except Exception as err:  # a database that cannot be reached: one line, not a traceback
        raise UserError(f"cannot open the database {registry.engine.url.render_as_string()}: "
                        f"{str(err).splitlines()[0]}", hint="check --db") from None
    return registry
