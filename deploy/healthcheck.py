"""Container health check: exit 0 when GET /readyz answers 200, else 1 (standard library only).

Used by the image's HEALTHCHECK and by deploy/docker-compose.yml; the port is $BENTOML_PORT
(the container entrypoint honours it) or 3000, the URL can be given as the first argument.
"""

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{os.environ.get('BENTOML_PORT', '3000')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (503 while loading) is a URLError
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
