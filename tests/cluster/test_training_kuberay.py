"""The KubeRay RayJob example parses, runs our train entry point, and asks for what the train config needs."""

from __future__ import annotations

import shlex

import yaml

from mergescale.cluster.job import COMMANDS
from mergescale.training.cli import add_arguments
from tests.helpers import REPO


def test_train_rayjob_example():
    doc = yaml.safe_load((REPO / "configs/kuberay/train-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and isinstance(spec["backoffLimit"], int)
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)

    # entrypoint: our job module, with arguments the train parser accepts
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "mergescale.cluster.job", "train"] and "train" in COMMANDS
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(argv[4:])
    assert args.recipe in ("expert", "multitask", "instruct")

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    groups = cluster["workerGroupSpecs"]
    gpus = 0
    for g in groups:
        c = g["template"]["spec"]["containers"][0]
        per_pod = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert per_pod == int(c["resources"]["requests"]["nvidia.com/gpu"])
        gpus += per_pod * g["replicas"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/shared" in mounts  # checkpoints and output on storage every worker sees
    # one Ray Train worker per GPU: the cluster holds exactly the workers the job asks for
    assert gpus == args.workers == 8


def test_study_rayjob_example():
    """The study RayJob runs `study run` on a config that validates, on a cluster that fits what it asks for."""
    from mergescale.study.cli import add_arguments as study_arguments
    from mergescale.study.config import load_study_config

    doc = yaml.safe_load((REPO / "configs/kuberay/study-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["backoffLimit"], int)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "mergescale.cluster.job", "study"] and "study" in COMMANDS
    import argparse

    p = argparse.ArgumentParser()
    study_arguments(p)
    args = p.parse_args(argv[4:])
    assert args.study_command == "run"
    cfg = load_study_config(REPO / args.config)
    assert cfg.work_dir.startswith("/shared/")
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.training["cluster"]["workers"] <= gpus  # the experts' training fits
    assert cfg.eval.num_gpus <= gpus and (cfg.merge.workers or 1) * cfg.merge.num_gpus <= gpus
    for b in cfg.bases:
        assert b.path.startswith("/shared/")
