"""The Python client installs next to the frameworks pipelines run it in:
pip's resolver finds versions of everything for the client together with
the current release of apache-beam (with the client's `beam` extra, which
normserve.beam needs), and separately with tensorflow's
(`pip install --dry-run`, nothing installed; needs PyPI). The current
release is asked of the index, and the resolution must pick it: a conflict
would otherwise hide behind an older release."""

import concurrent.futures
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import CLIENT_DIR

FRAMEWORKS = ["apache-beam", "tensorflow"]
# The client's extra for a framework, if it has one.
EXTRAS = {"apache-beam": "beam"}
# pip's own cache (~/.cache/pip) keeps index pages and metadata between runs.
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def latest_release(name):
    done = subprocess.run([*PIP, "index", "versions", name], capture_output=True, text=True, timeout=120)
    match = re.match(rf"{re.escape(name)} \(([^)]+)\)", done.stdout)
    assert done.returncode == 0 and match, f"pip index versions {name} failed: {done.stdout}{done.stderr}"
    return match.group(1)


def resolve(name, report):
    """What `pip install --dry-run` would install for the client and `name`."""
    client = f"{CLIENT_DIR}[{EXTRAS[name]}]" if name in EXTRAS else CLIENT_DIR
    done = subprocess.run(
        [*PIP, "install", "--dry-run", "--ignore-installed", "--quiet", "--no-build-isolation",
         "--report", str(report), client, name],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the client and {name} do not resolve together:\n{done.stderr[-4000:]}"
    with open(report) as f:
        return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.load(f)["install"]}


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory):
    if os.environ.get("NORMSERVE_OFFLINE"):
        pytest.skip("NORMSERVE_OFFLINE is set: resolving against PyPI needs the network")
    d = tmp_path_factory.mktemp("resolve")
    with concurrent.futures.ThreadPoolExecutor(len(FRAMEWORKS) * 2) as pool:
        latest = dict(zip(FRAMEWORKS, pool.map(latest_release, FRAMEWORKS)))
        resolved = dict(zip(FRAMEWORKS, pool.map(lambda name: resolve(name, d / f"{name}.json"), FRAMEWORKS)))
    return latest, resolved


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_client_installs_beside_the_current_release(resolutions, framework):
    latest, resolved = resolutions
    installed = resolved[framework]
    assert installed.get("normserve") == "0.1.0"
    assert installed.get(framework) == latest[framework], (
        f"pip resolved {framework} {installed.get(framework)}, not the current {latest[framework]}: "
        f"the current release conflicts with the client's dependencies")
    assert "grpcio" in installed and "protobuf" in installed
