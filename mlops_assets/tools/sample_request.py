"""Send one sample prediction to the endpoint and print it with the curl command that reproduces it.

`python -m mlops_assets.tools.sample_request [--endpoint URL] [--records N] [--dataset NAME]`; the token is
read from MLOPS_API_TOKEN and shown in the command as `$MLOPS_API_TOKEN`, never printed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence

import httpx

from mlops_assets.core.dataset_spec import load_spec
from mlops_assets.serving.config import TOKEN_ENV


def curl_command(endpoint: str, body: dict) -> str:
    return (f"curl -sS -X POST {shlex.quote(endpoint)} -H 'Content-Type: application/json' "
            f"-H \"Authorization: Bearer ${TOKEN_ENV}\" -d {shlex.quote(json.dumps(body))}")


def main(argv: Sequence[str] | None = None) -> int:
    from mlops_assets.deployment.rollout import simulated_sample, target_from_settings
    from mlops_assets.settings import dataset_settings, load_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=None, help="serving URL (default: MLOPS_SERVE_URL or the local port)")
    parser.add_argument("--records", type=int, default=2)
    parser.add_argument("--dataset", default=None, help="which data set's endpoint (MLOPS_DATASETS; default: the first)")
    args = parser.parse_args(argv)
    settings = dataset_settings(load_settings(), args.dataset)
    target = target_from_settings(settings, serve_url=args.endpoint)
    spec = load_spec(settings.dataset_spec_path)
    body = {"records": simulated_sample(spec, n=max(1, args.records), seed=7)}
    try:
        response = httpx.post(target.endpoint, json=body, timeout=30, trust_env=False,
                              headers={"Authorization": f"Bearer {target.token}"})
    except httpx.HTTPError as exc:
        print(f"no answer from {target.endpoint}: {type(exc).__name__}", file=sys.stderr)
        return 1
    print(f"POST {target.endpoint} -> {response.status_code}")
    print(json.dumps(response.json(), indent=1))
    print("\nreproduce with:\n  " + curl_command(target.endpoint, body))
    return 0 if response.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
