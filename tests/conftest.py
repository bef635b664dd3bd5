"""Shared fixtures: tiny Llama checkpoints built locally once per session (helpers to read and forge them are in
tests/helpers.py), the task registry restored after each test, and one Ray session per process.

Families (all float32 unless noted, random init from `mergescale.tiny`, >= 2 safetensors shards):
  family   hidden 64, 2 layers, BPE tokenizer; base + 3 experts (reference comparisons, I/O, CLI)
  micro    hidden 32, 1 layer, vocab 64, no tokenizer; base + 3 experts (cheap: many tile sizes)
  scaled   the family base + 2 experts whose task vectors have very different scales per tensor
  bf16     hidden 64 in bfloat16; base + 2 experts
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.register_assert_rewrite("tests.helpers")  # its asserts report values, as in a test module

from mergescale.tiny import build_tiny_llama, make_expert  # noqa: E402
from tests.helpers import Family, load_f32  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
# The tensors here are tiny: intra-op threads only add OpenMP barrier waits (seconds per merge on a loaded machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Family:
    root = tmp_path_factory.mktemp("family")
    base = build_tiny_llama(root / "base", seed=0, hidden=64, heads=2, max_shard_size="100KB")
    experts = [make_expert(base, root / f"expert{i}", seed=1 + i, max_shard_size="100KB") for i in range(3)]
    return Family(base, experts)


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> Family:
    root = tmp_path_factory.mktemp("micro")
    kw = dict(hidden=32, heads=1, layers=1, vocab_size=64, max_shard_size="20KB")
    base = build_tiny_llama(root / "base", seed=5, tokenizer=False, **kw)
    experts = [make_expert(base, root / f"expert{i}", seed=50 + i, max_shard_size="20KB") for i in range(3)]
    return Family(base, experts)


@pytest.fixture(scope="session")
def scaled(tmp_path_factory, family) -> Family:
    root = tmp_path_factory.mktemp("scaled")
    scales = {"mlp": 10.0, "embed_tokens": 0.1}
    experts = [
        make_expert(family.base, root / f"expert{i}", seed=20 + i, max_shard_size="100KB", tensor_scales=scales)
        for i in range(2)
    ]
    return Family(family.base, experts)


@pytest.fixture(scope="session")
def bf16(tmp_path_factory) -> Family:
    root = tmp_path_factory.mktemp("bf16")
    base = build_tiny_llama(root / "base", seed=3, dtype=torch.bfloat16, hidden=64, heads=2, max_shard_size="60KB")
    experts = [make_expert(base, root / f"expert{i}", seed=30 + i, max_shard_size="60KB") for i in range(2)]
    return Family(base, experts)


@pytest.fixture(scope="session")
def base_sd(family) -> dict[str, torch.Tensor]:
    return load_f32(family.base)


@pytest.fixture(scope="session")
def expert_sds(family) -> list[dict[str, torch.Tensor]]:
    return [load_f32(e) for e in family.experts]


def _task_registry():
    from mergescale.eval import tasks

    tasks.all_tasks()  # load the shipped registry first, so a snapshot holds it
    return tasks._TASKS


@pytest.fixture(autouse=True, scope="module")
def _restore_task_registry_per_module():
    """Tasks a test module registers (register_tasks) must not leak into later modules' view of the registry."""
    registry = _task_registry()
    saved = dict(registry)
    yield
    registry.clear()
    registry.update(saved)


@pytest.fixture(autouse=True)
def _restore_task_registry_per_test(_restore_task_registry_per_module):
    registry = _task_registry()
    saved = dict(registry)
    yield
    registry.clear()
    registry.update(saved)


# --- One Ray session per process ---------------------------------------------------------------------------------
# Ray does not support ray.shutdown() followed by another ray.init() in one process (mergescale/cluster/session.py,
# ray-project/ray#31145): a pytest process that cycled these modules' sessions crashed at exit after every test had
# passed. Each module that starts its own Ray (its fixture's ray.init settings, a multi-node Cluster) therefore runs
# its selected tests in a pytest process of its own; every other test must leave no Ray session behind.
TESTS = Path(__file__).resolve().parent
OWN_RAY_SESSION = (  # paths under tests/
    "cluster/test_cluster_faults.py", "cluster/test_cluster_merge.py", "cluster/test_cluster_multinode.py",
    "cluster/test_eval_ray.py", "cluster/test_push_actors.py", "cluster/test_push_study.py",
    "cluster/test_ray_workers.py", "merge/test_merge_bytes.py", "training/test_training_ray.py",
)
_CHILD_ENV = "MERGESCALE_TEST_OWN_RAY"  # set in such a child: its module runs in-process there


class _ChildFailed(Exception):
    pass


class OwnRaySessionRun(pytest.Item):
    """The selected tests of one OWN_RAY_SESSION module, run by a child pytest; passes when they all pass."""

    def __init__(self, *, nodeids, **kw):
        super().__init__(**kw)
        self.nodeids = nodeids
        # the child applies the per-test timeout (pyproject) to each of its tests; this item is all of them at once
        self.add_marker(pytest.mark.timeout(3600))

    def runtest(self):
        root = self.config.rootpath
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *self.nodeids]
        r = subprocess.run(cmd, cwd=root, env={**os.environ, _CHILD_ENV: "1"}, capture_output=True, text=True)
        tail = r.stdout.strip().splitlines()[-1:] or [""]
        self.user_properties.append(("child", tail[0]))
        if r.returncode != 0:
            raise _ChildFailed(f"{' '.join(cmd[3:])} exited {r.returncode}:\n{r.stdout[-20000:]}\n{r.stderr[-4000:]}")

    def repr_failure(self, excinfo):
        return str(excinfo.value) if isinstance(excinfo.value, _ChildFailed) else super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.name} ({len(self.nodeids)} test(s), own process)"


def pytest_configure(config):
    missing = [p for p in OWN_RAY_SESSION if not (TESTS / p).is_file()]
    if missing:  # a moved or renamed module would otherwise silently share the parent's process again
        raise pytest.UsageError(f"OWN_RAY_SESSION in tests/conftest.py lists {missing}: no such file under tests/")


def _own_ray_module(item) -> str | None:
    """The item's module as listed in OWN_RAY_SESSION, or None when it runs in the shared process."""
    rel = item.path.relative_to(TESTS).as_posix() if item.path.is_relative_to(TESTS) else None
    return rel if rel in OWN_RAY_SESSION else None


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: the child runs exactly what was selected
def pytest_collection_modifyitems(session, config, items):
    if os.environ.get(_CHILD_ENV):
        return
    out, groups = [], {}
    for item in items:
        module = _own_ray_module(item)
        if module is not None:
            if module not in groups:
                groups[module] = []
                out.append(module)  # placeholder: keeps the module's place in the order
            groups[module].append(item)
        else:
            out.append(item)
    items[:] = [OwnRaySessionRun.from_parent(groups[x][0].getparent(pytest.Module), name=Path(x).name,
                                             nodeids=[i.nodeid for i in groups[x]]) if isinstance(x, str) else x
                for x in out]


@pytest.fixture(autouse=True)
def _no_ray_session_left_behind():
    yield
    ray = sys.modules.get("ray")
    if not os.environ.get(_CHILD_ENV) and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test left a Ray session in the shared pytest process: list its module (its path under "
                    "tests/) in OWN_RAY_SESSION in tests/conftest.py")


def pytest_terminal_summary(terminalreporter):
    """The tallies of the child processes, which the parent counts as one test per module."""
    lines = [f"{r.nodeid}: {v}" for kind in ("passed", "failed") for r in terminalreporter.stats.get(kind, [])
             if r.when == "call" for k, v in r.user_properties if k == "child"]
    if lines:
        terminalreporter.write_sep("-", "modules run in their own process (one Ray session each)")
        for line in lines:
            terminalreporter.write_line(line)
