"""Service settings: one pydantic-settings class, environment variables prefixed HOREN_.
Built by the caller (`create_app(settings)`), never at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from horen_core.config import HorenConfig

# the prefilter's defaults, shared by Settings and service.index.KeyIndex
INDEX_DEFAULTS = {"min_keys": 4096, "top_k": 512, "scan_k": 2048, "code_dims": 4, "scan_threads": 0}


class ApiKeySetting(BaseModel):
    """One entry of HOREN_API_KEYS."""

    name: str = Field(min_length=1, max_length=255)  # recorded as the actor of what the key does
    key: SecretStr = Field(min_length=16)  # secret: kept out of reprs and logs
    role: Literal["read", "edit", "admin"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOREN_", extra="ignore")

    # folder for the SQLite file and the converted copy of a GGUF model's weights
    data_dir: Path = Path(".horen")
    # where a dequantised copy of a GGUF model is kept (fast restarts); empty = data_dir/converted
    converted_dir: Path | None = None
    # SQLAlchemy URL; empty means an SQLite file in data_dir
    database_url: str = ""
    # bearer token for /admin routes; empty disables them. It is also the admin API key named `admin`
    admin_token: str = ""
    # API keys as JSON, [{"name", "key", "role": "read" | "edit" | "admin"}]; with none here and none
    # made through /admin/keys every route but /admin is open (and edits only on a loopback host)
    api_keys: list[ApiKeySetting] = Field(default_factory=list)
    # the model id /v1 routes answer to; empty = the model folder's or file's name
    served_model_name: str = ""
    # local HF model folder or GGUF file; empty means the bundled SmolLM2-135M-Instruct
    model: str = ""
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # relation gate file for a model that ships without one (scripts/fit_gate.py); empty = the shipped one, if any
    relation_gate: Path | None = None
    # accelerate device map for models larger than one GPU (e.g. "auto"); empty = whole model on `device`
    device_map: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    # bounded request queue in front of the engine; a full queue answers 503
    queue_size: int = Field(default=256, ge=1)
    # most /generate requests run together as one batch
    max_batch: int = Field(default=16, ge=1)
    # upper bound accepted for max_new_tokens
    max_new_tokens_limit: int = Field(default=512, ge=1)
    # largest request body in bytes (413 above): a 100-edit batch of long prompts fits
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # most facts in one POST /imports (422 above), and its largest body in bytes (413 above; held in memory)
    max_import_facts: int = Field(default=100_000, ge=1)
    max_import_facts_bytes: int = Field(default=256 * 1024**2, ge=1024)
    # facts an import makes in a row (their values trained together) before the engine serves waiting
    # requests again
    import_chunk: int = Field(default=4, ge=1)
    # largest POST /admin/import-codebook body in bytes (413 above); streamed to a temporary file in
    # data_dir, not held in memory: 50,000 SmolLM2 edits are about 0.45 GB
    max_import_bytes: int = Field(default=2 * 1024**3, ge=1024)
    # longest prompt in tokens, of an edit or a generation (422 above; the model's context also bounds it)
    max_prompt_tokens: int = Field(default=2048, ge=1)
    # longest edit target in tokens (422 above): a fact, not an essay
    max_target_tokens: int = Field(default=64, ge=1)
    # largest edit metadata as compact JSON in bytes, and its deepest nesting (422 above)
    max_metadata_bytes: int = Field(default=16_384, ge=2)
    max_metadata_depth: int = Field(default=8, ge=1)
    # most edits in one POST /edits/batch (422 above)
    max_batch_edits: int = Field(default=100, ge=1)
    # requests one client (API key, else IP address) may have in flight at once; 0 = no limit (429 above)
    max_client_concurrency: int = Field(default=32, ge=0)
    # seconds a 503 for an unavailable database asks the client to wait (Retry-After)
    db_retry_after: int = Field(default=2, ge=1)
    # seconds between catch-up polls of the edit log (replicas also get LISTEN/NOTIFY on PostgreSQL)
    sync_interval: float = Field(default=1.0, gt=0)
    # retries of an edit whose codebook entry was changed concurrently by another replica
    conflict_retries: int = Field(default=3, ge=0)
    # codebook size from which the FAISS prefilter is used (exact search below it)
    index_min_keys: int = Field(default=INDEX_DEFAULTS["min_keys"], ge=0)
    # candidates the prefilter hands to exact routing per query (more than hopfield_support makes up
    # for the index's blur; measurements: docs/benchmarks.md)
    index_top_k: int = Field(default=INDEX_DEFAULTS["top_k"], ge=1)
    # quantised codes one scan fetches, re-ranked exactly down to index_top_k (<= index_top_k: none)
    index_scan_k: int = Field(default=INDEX_DEFAULTS["scan_k"], ge=1)
    # index dimensions per 4-bit PQ code: 4 = 32 bytes scanned per key, 2 = 64 bytes (finer, slower)
    index_code_dims: int = Field(default=INDEX_DEFAULTS["code_dims"], ge=1)
    # shards one prefilter scan is split into, each on its own thread (0: the usable cores, at most 4)
    index_threads: int = Field(default=INDEX_DEFAULTS["scan_threads"], ge=0)
    # HoReN method settings (layer, threshold, ...), as JSON, e.g. HOREN_HOREN='{"threshold": 0.85}'
    horen: dict = Field(default_factory=dict)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'horen.db').resolve()}"

    def horen_config(self) -> HorenConfig:
        cfg = HorenConfig.from_dict(self.horen)
        cfg.validate()
        return cfg
