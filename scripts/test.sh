#!/usr/bin/env bash
# Runs the whole test suite: tiny-model unit tests, real-model tests, PostgreSQL and live-server tests.
# Needs PostgreSQL at HOREN_TEST_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check horen_core service tests bench scripts
exec .venv/bin/python -m pytest -q "$@"
