#!/usr/bin/env bash
# Container entrypoint. `serve` (the default) brings the database schema to head, then hands PID 1 to the
# server so it gets SIGTERM directly; `migrate` only migrates; anything else runs as given
# (e.g. `docker compose run --rm api horen eval --help`).
set -euo pipefail

migrate() {
    # the database may still be starting when the container does (outside compose's depends_on)
    local attempt
    for attempt in 1 2 3 4 5; do
        if alembic -c /app/alembic.ini upgrade head; then
            return 0
        fi
        echo "horen-entrypoint: alembic upgrade head failed (attempt ${attempt}/5)" >&2
        sleep $((attempt * 2))
    done
    echo "horen-entrypoint: giving up on migrations" >&2
    return 1
}

case "${1:-serve}" in
    serve)
        if [ "$#" -gt 0 ]; then shift; fi
        # replicas after the first can skip the step: HOREN_MIGRATE=0
        if [ "${HOREN_MIGRATE:-1}" != "0" ]; then
            migrate
        fi
        # --no-migrate: the step above owns migrations, so HOREN_MIGRATE=0 really skips them
        exec horen serve --host 0.0.0.0 --port "${HOREN_PORT:-8000}" --no-migrate "$@"
        ;;
    migrate)
        migrate
        ;;
    *)
        exec "$@"
        ;;
esac
