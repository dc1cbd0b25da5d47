"""Shared fixtures (gloo process groups) and the test tiers.

``pytest -m unit`` (quick) / ``-m dist`` / ``-m multinode`` select disjoint sets; ``slow`` marks
long tests on top of that (a slow test is never ``unit``: one that would be is only ``slow``):

- ``multinode``: the modules in ``MULTINODE_MODULES`` (network namespaces + sshd);
- ``dist``: tests that use the spawned-rank fixtures (``world2``, ``world3``), the modules in
  ``DIST_MODULES`` and the tests in ``DIST_TESTS`` (real launches, torchrun, spawned processes);
- ``unit``: everything else that is not ``slow``.

A test module may also set its own marker (``pytestmark = pytest.mark.dist``); it then keeps it.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# W&B follows each test's config (tracking.wandb.mode: offline by default, disabled where a test
# does not look at W&B): an inherited WANDB_MODE would override every config and start an offline
# W&B run (seconds of CPU) in tests that turned it off. No test ever goes online.
for _var in ("WANDB_MODE", "WANDB_DISABLED"):
    os.environ.pop(_var, None)

from harness import DistHarness  # noqa: E402

TIERS = ("unit", "dist", "multinode")
SPAWNING_FIXTURES = {"world2", "world3"}
MULTINODE_MODULES = {"test_launch_multinode"}
DIST_MODULES = {
    "test_bench_step",  # benchmark ranks
    "test_chaos",  # launches killed, signalled, stalled and resumed
    "test_checkpoint",  # torchrun restarts, killed ranks
    "test_engine_checkpoints",  # DCP checkpoints of fsdp2 / DeepSpeed ZeRO-1/2 runs, resumed and resharded
    "test_engines",  # DeepSpeed / FSDP2 on gloo ranks, the real deepspeed launcher
    "test_export",  # runs whose checkpoints are exported
    "test_faults",  # signals to real launches
    "test_launch_run",  # torchrun, deepspeed, mpiexec and local launches
    "test_precision",  # bf16 / fp16 runs on gloo ranks, their checkpoints and reshards
    "test_reliability",  # launches that are refused, signalled after they ended, resumed
}
# single tests in otherwise quick modules that start ranks or whole training processes
DIST_TESTS = {
    "test_large_batch.py::test_tiny_sweep_writes_well_formed_report_and_plot",  # a pool of spawned workers
    "test_plan.py::test_plan_prints_the_table_for_a_real_two_rank_run",  # the probe: a 2-rank quickstart run
    "test_plan.py::test_plan_refuses_a_run_without_b_simple",  # (the same module-scoped probe run)
    "test_readme.py::test_python_example_runs_on_two_ranks",  # torchrun
    "test_tracking.py::test_killed_and_resumed_run_continues_same_wandb_run",  # a crashing training process
    "test_train.py::test_cli_under_torchrun_matches_in_process_run",  # torchrun
}
SLOW_MODULES = {"test_bench_step", "test_package"}  # benchmark runs, a wheel build
SLOW_TESTS = {"test_large_batch.py::test_tiny_sweep_writes_well_formed_report_and_plot"}  # about a minute
# Rough CPU seconds of the costly modules (measured, without the start of the shared gloo ranks;
# only their order matters). Modules run longest first, so that the two xdist workers of
# scripts/test.sh (``--dist loadfile --no-loadscope-reorder``: whole modules, in this order) finish
# together instead of one worker ending alone on a long module. A module not listed counts as
# MODULE_COST_DEFAULT_S if it spawns processes, else 0 (it runs last).
MODULE_COST_S = {
    "test_user_model": 90,
    "test_launch_run": 70,
    "test_launch_multinode": 70,
    "test_checkpoint": 65,
    "test_faults": 65,
    "test_examples": 60,
    "test_bench_step": 55,
    "test_engine_checkpoints": 60,  # DeepSpeed and fsdp2 launches (first, with the other long ones)
    "test_reliability": 40,
    "test_export": 40,
    "test_chaos": 35,
    "test_orphans": 40,  # little CPU, but it waits for processes to die
    "test_api": 30,
    "test_large_batch": 28,
    "test_engines": 25,
    "test_package": 25,  # a wheel build and a fresh venv
    "test_swa": 25,
    "test_train": 25,
    "test_engine_exact": 25,
    "test_precision": 15,
    "test_shampoo": 15,
    "test_task_import": 15,
    "test_readme": 12,
    "test_plan": 12,
    "test_param_gather": 10,
    "test_overlap_trainer": 6,
    "test_peers": 8,
    "test_tracking": 8,
    "test_engine_state_codec": 3,
    "test_registry": 3,
    "test_engine_features": 3,
}
MODULE_COST_DEFAULT_S = 20


def _test_id(item: pytest.Item) -> str:
    """``test_x.py::test_name`` without the directory and the parameters."""
    return item.nodeid.split("/")[-1].split("[")[0]


def _tier(item: pytest.Item) -> str | None:
    own = [t for t in TIERS if item.get_closest_marker(t)]
    if own:
        return None  # set by the test module itself
    module = item.module.__name__ if item.module is not None else ""
    if module in MULTINODE_MODULES:
        return "multinode"
    if module in DIST_MODULES or _test_id(item) in DIST_TESTS or SPAWNING_FIXTURES & set(item.fixturenames):
        return "dist"
    return "unit"


def _module_name(item: pytest.Item) -> str:
    return item.module.__name__ if item.module is not None else ""


def _spawns(item: pytest.Item) -> bool:
    return (
        _module_name(item) in DIST_MODULES | MULTINODE_MODULES
        or _test_id(item) in DIST_TESTS
        or bool(SPAWNING_FIXTURES & set(item.fixturenames))
        or any(item.get_closest_marker(t) is not None for t in ("dist", "multinode"))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # costly modules first; stable, so every module's tests stay together and in their order
    cost: dict[str, float] = {}
    for item in items:
        module = _module_name(item)
        if module in MODULE_COST_S:
            cost[module] = MODULE_COST_S[module]
        elif _spawns(item):
            cost[module] = MODULE_COST_DEFAULT_S
        else:
            cost.setdefault(module, 0)
    items.sort(key=lambda item: -cost[_module_name(item)])
    for item in items:
        module = item.module.__name__ if item.module is not None else ""
        slow = (
            module in SLOW_MODULES
            or _test_id(item) in SLOW_TESTS
            or item.get_closest_marker("slow") is not None
        )
        if slow and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        tier = _tier(item)
        if tier == "unit" and slow:
            continue  # slow tests are never part of the quick tier
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def _worlds():
    """The spawned gloo worlds, by size: started on first use and shared by every module of this
    pytest process (each rank imports torch, seconds of CPU; a module's calls are independent
    functions of (rank, world, args)). A world whose call failed or timed out is restarted by the
    harness on its next call."""
    worlds: dict[int, DistHarness] = {}
    yield worlds
    for h in worlds.values():
        h.close()


def _world(worlds: dict[int, DistHarness], size: int) -> DistHarness:
    if size not in worlds:
        worlds[size] = DistHarness(size)
    return worlds[size]


@pytest.fixture(scope="module")
def world2(_worlds):
    return _world(_worlds, 2)


@pytest.fixture(scope="module")
def world3(_worlds):
    return _world(_worlds, 3)
