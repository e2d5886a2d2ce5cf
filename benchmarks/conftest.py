"""pytest setup for the benchmarks: the thread count, and the machine stored in the JSON."""

from benchmarks import cases, machine

cases.set_threads()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastdml"] = {**machine.describe(), "quick": cases.QUICK}
