"""``horen import FILE``: send a JSONL file of facts to a running service's POST /imports and follow
its progress until it ends. Ctrl-C cancels the import; what it committed stays."""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx
from tqdm import tqdm

ENDED = ("done", "failed", "cancelled")


def import_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="horen import", description=__doc__)
    p.add_argument("file", help='JSONL: one {"prompt", "target", "metadata"?, "subject"?, "format"?} per line')
    p.add_argument(
        "--url", default=os.environ.get("HOREN_URL", "http://127.0.0.1:8000"), help="the service (HOREN_URL)"
    )
    p.add_argument(
        "--key", default=os.environ.get("HOREN_API_KEY"), help="an API key with the edit role (HOREN_API_KEY)"
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks")
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=60.0) as client:
        with open(args.file, "rb") as f:
            r = client.post("/imports", content=f.read(), headers={"Content-Type": "application/x-ndjson"})
        if r.status_code != 202:
            print(f"horen import: {r.status_code} {_message(r)}", file=sys.stderr)
            return 2
        job = r.json()
        bar = tqdm(total=job["total"], unit="fact", desc=f"import {job['id']}")
        try:
            while job["status"] not in ENDED:
                time.sleep(args.poll)
                job = client.get(f"/imports/{job['id']}").json()
                bar.n = job["done"] + job["failed"]
                bar.set_postfix(done=job["done"], failed=job["failed"])
                bar.refresh()
        except KeyboardInterrupt:
            job = client.delete(f"/imports/{job['id']}").json()
        finally:
            bar.close()
    for e in job.get("errors", []):
        print(f"line {e['line']}: {e['error']}", file=sys.stderr)
    print(
        f"import {job['id']} {job['status']}: {job['done']} edits made, {job['failed']} facts failed, "
        f"{job['pending']} not made" + (f" ({job['message']})" if job.get("message") else "")
    )
    return 0 if job["status"] == "done" else 1


def _message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
