"""What an upstream that closes each kept-alive connection soon after answering costs.

``python -m bench.dying_keepalive`` starts smart (2 workers, gunicorn as production
starts it) in front of a raw-socket upstream on 127.0.0.1 that answers one request per
connection and closes it ``--close-after-ms`` later, reading nothing more: a request
smart sends on that connection meanwhile is lost, though the upstream answered every
request it read. Closed-loop clients send a bounded number of requests; the report is
the share of 502s, attempts per request and the upstream connections each request
cost. ``--source DIR`` runs the smart of another tree (``git archive COMMIT | tar -x -C
DIR``), so the policy's effect is measured before and after in one session.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
from gevent.pool import Pool  # noqa: E402

from harness.gunicorn import Gunicorn  # noqa: E402
from tests.e2e.hostile import HostileUpstream, Request, response  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Two workers start in about a second; a shared box can take several times that.
START_TIMEOUT_S = 30.0
#: The run stops at this however many requests are left: the box is shared.
MAX_DURATION_S = 60.0
_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")


def dying(close_after_s: float) -> object:
    def answer(request: Request) -> bool:
        request.send(response(b'{"time": 1}'))
        gevent.sleep(close_after_s)  # the upstream's idle timeout
        return False

    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=ROOT, help="tree whose smart to run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="in all")
    parser.add_argument("--close-after-ms", type=float, default=20.0)
    args = parser.parse_args()

    statuses: collections.Counter[int] = collections.Counter()
    attempts = 0
    left = args.requests
    stop_at = time.monotonic() + MAX_DURATION_S

    def client(url: str) -> None:
        nonlocal attempts, left
        with requests.Session() as session:
            while left > 0 and time.monotonic() < stop_at:
                left -= 1
                answer = session.get(url, timeout=10)
                statuses[answer.status_code] += 1
                attempts += int(answer.headers.get("X-Smart-Attempts", "0"))

    with HostileUpstream(dying(args.close_after_ms / 1000)) as upstream:
        env = {
            "SMART_UPSTREAM_URL": upstream.work_url,
            "SMART_LOG_REQUESTS": "false",
            "SMART_LOOP_LAG_TARGET_MS": "0",
        }
        server = Gunicorn(env, workers=2, root=args.source.resolve())
        server.start()
        port = server.port
        try:
            url = f"http://127.0.0.1:{port}/api/smart?timeout=2000"
            started = time.monotonic()
            load = Pool(args.clients)
            for _ in range(args.clients):
                load.spawn(client, url)
            load.join(timeout=MAX_DURATION_S + 10)
            elapsed = time.monotonic() - started
            metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            server.stop()
    done = sum(statuses.values())
    reconnects = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("smart_upstream_reconnects_total")
    )
    print(f"source: {args.source}  clients: {args.clients}  close after: {args.close_after_ms} ms")
    print(f"requests: {done} in {elapsed:.1f} s  statuses: {dict(statuses)}")
    print(f"502: {statuses[502] / done:.2%}  attempts per request: {attempts / done:.3f}")
    print(
        f"upstream connections per request: {upstream.connections / done:.3f}  "
        f"requests the upstream read per request: {upstream.requests / done:.3f}  "
        f"reconnects: {reconnects:.0f}"
    )


if __name__ == "__main__":
    main()
