"""Screenshots of a finished run in the MLflow UI, taken in a real (headless) browser.

Usage: ``python benchmarks/ui_screenshots.py --tracking-uri sqlite:///mlflow.db [--run-name
NAME] [--out-dir docs]``

Starts `mlflow ui` on 127.0.0.1 against the store, finds the newest finished fedmrg parent run
(or the one named), and takes two screenshots with headless Chromium (Debian's `chromium`
package; `--chromium` names another binary): the run's page (description, metrics, the
"Models" column with its logged models) -> `mlflow_run.png`, and its generic model's page ->
`mlflow_model.png`. Checks before writing that the UI answered and that each image is not
blank. The pages are the UI's own routes: `#/experiments/<id>/runs/<run id>` and
`#/experiments/<id>/models/<model id>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import _common  # first: sets the environment

DEFAULT_OUT = _common.ROOT / "docs"
WINDOW = "1500,1250"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_run(tracking_uri: str, experiment: str, run_name: str | None) -> tuple[str, str, str]:
    """(experiment id, parent run id, generic model id) of the run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    query = "tags.`fedmrg.role` = 'parent' and attributes.status = 'FINISHED'"
    if run_name:
        query += f" and attributes.run_name = '{run_name}'"
    runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise SystemExit(f"no finished fedmrg run{' named ' + run_name if run_name else ''} in "
                         f"experiment {experiment!r}")
    run_id = runs[0].info.run_id
    models = [m for m in client.search_logged_models([exp.experiment_id])
              if m.source_run_id == run_id and m.name == "generic"]
    if not models:
        raise SystemExit(f"run {run_id} has no logged generic model (tracking.log_models off?)")
    return exp.experiment_id, run_id, models[0].model_id


def screenshot(chromium: str, url: str, out: Path, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="fedmrg-chromium-") as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
                   "--hide-scrollbars", f"--user-data-dir={profile}",
                   f"--window-size={WINDOW}", f"--virtual-time-budget={wait_ms}",
                   f"--screenshot={out}", url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed on {url}: {done.stderr.strip()[-800:]}")
    from PIL import Image

    with Image.open(out) as image:
        extrema = image.convert("L").getextrema()
    if extrema[0] == extrema[1]:
        raise SystemExit(f"{out}: a blank page ({url})")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="fedmrg")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--wait-ms", type=int, default=20000,
                        help="virtual time the page gets to render before the screenshot")
    args = parser.parse_args(argv)

    experiment_id, run_id, model_id = find_run(args.tracking_uri, args.experiment,
                                               args.run_name)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    server = subprocess.Popen(
        [str(Path(bin_dir) / "mlflow"), "ui", "--backend-store-uri", args.tracking_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    written = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("mlflow ui did not start: "
                                     + server.stdout.read().decode()[-1500:]) from None
                time.sleep(0.5)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        pages = {"mlflow_run.png": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
                 "mlflow_model.png": f"{base}/#/experiments/{experiment_id}/models/{model_id}"}
        for name, url in pages.items():
            screenshot(args.chromium, url, args.out_dir / name, args.wait_ms)
            written.append(args.out_dir / name)
            print(f"{url} -> {args.out_dir / name}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)  # mlflow ui and the server it started
        server.wait(timeout=30)
    return written


if __name__ == "__main__":
    main()
