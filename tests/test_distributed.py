"""Fitting on a Dask cluster: the weights of the fit in one process, a worker lost mid-fit,
resuming from kept triangles, a cluster that cannot finish, and a driver whose memory does not
grow with the data. Clusters are LocalClusters of worker processes started by the tests."""

import os
import signal
import threading
import time
import warnings

import ase.build
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from acdc_potential.cli import main
from acdc_potential.config import FitConfig
from acdc_potential.errors import ClusterError, DataFileError, StructureError
from acdc_potential.fit import tasks
from acdc_potential.fit.driver import fit
from acdc_potential.fit.executors import DaskExecutor, InProcess, tree_reduce
from acdc_potential.fit.sources import ExtxyzSource, MemorySource

distributed = pytest.importorskip("distributed")

# small and fast, with the design matrix and the tasks cut small enough that the tuning sees a
# sample, the other structures stream into the final solve, and the final solve has many tasks
CONFIG = {
    "density": {"cutoff": 3.5, "max_radial": 4, "max_angular": 2},
    "kernel": {"nu_max": 2, "lambda_max": 2},
    "sparse": {"n": 16},
    "options": {"tune": True, "design_memory": 1e-4},
    "cluster": {"task_memory": 3e-5, "task_structures": 5},
}


def copper_frames(n: int, seed: int = 0):
    """EMT-labelled 8-atom copper cells, strained and rattled (energy, forces, stress)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        strain = np.eye(3) + 0.02 * rng.normal(size=(3, 3))
        atoms.set_cell(atoms.cell.array @ (0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.positions += 0.1 * rng.normal(size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("distributed") / "copper.extxyz"
    ase.io.write(str(path), copper_frames(24))
    return str(path)


@pytest.fixture(scope="module")
def executor():
    with DaskExecutor(workers=2) as dask:
        yield dask


@pytest.fixture(scope="module")
def in_process_model(train_file):
    """The reference: the same fit in this process, on one thread as each worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return quiet_fit(ExtxyzSource(train_file), FitConfig.from_dict(CONFIG))
    finally:
        torch.set_num_threads(threads)


def quiet_fit(structures, config, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the baseline warning of data without isolated atoms
        return fit(structures, config, **options)


def assert_same_weights(model, reference):
    torch.testing.assert_close(model.weights, reference.weights, rtol=1e-8, atol=1e-8 * float(reference.weights.abs().max()))
    assert model.kernel.mixing == pytest.approx(reference.kernel.mixing, rel=1e-10)


def test_the_fit_streams_and_tunes_on_a_sample(train_file, in_process_model):
    """The configuration exercises what a large fit does: several groups, tuning on the first."""
    config = FitConfig.from_dict(CONFIG)
    source = ExtxyzSource(train_file)
    from acdc_potential.fit.design import design_groups
    from acdc_potential.fit.driver import survey_source

    survey = survey_source(source, InProcess(), config.cluster.task_structures)
    groups = design_groups(survey.row_counts(True, True, True), 3, in_process_model.kernel.n_sparse, config.options.design_memory * 1e9)
    assert len(groups) >= 3 and len(groups[0]) < len(source)
    assert in_process_model.report is not None and in_process_model.report.evaluations > 1


def test_distributed_fit_gives_the_weights_of_the_fit_in_one_process(train_file, executor, in_process_model):
    model = quiet_fit(ExtxyzSource(train_file), FitConfig.from_dict(CONFIG), executor=executor)
    assert_same_weights(model, in_process_model)
    structures = ase.io.read(train_file, ":3")
    torch.testing.assert_close(model.predict(structures)["forces"], in_process_model.predict(structures)["forces"], rtol=0, atol=1e-10)


def test_one_worker_gives_the_same_weights(train_file, in_process_model):
    with DaskExecutor(workers=1) as one:
        model = quiet_fit(ExtxyzSource(train_file), FitConfig.from_dict(CONFIG), executor=one)
    assert_same_weights(model, in_process_model)


def test_a_worker_killed_during_the_final_solve_is_replaced_and_the_weights_are_the_same(train_file, executor, in_process_model):
    client = executor.client
    killed = []

    def kill_a_worker_building_rows():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for address, keys in client.processing().items():
                if any(str(key).startswith("triangle-") for key in keys):
                    pid = client.run(os.getpid, workers=[address])[address]
                    os.kill(pid, signal.SIGKILL)
                    killed.append((address, pid))
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_a_worker_building_rows, daemon=True)
    killer.start()
    model = quiet_fit(ExtxyzSource(train_file), FitConfig.from_dict(CONFIG), executor=executor)
    killer.join()
    assert killed, "no worker was killed: the final solve ended before the test could kill one"
    assert_same_weights(model, in_process_model)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it, for the tests after this one


def test_an_interrupted_fit_resumes_from_the_kept_triangles(train_file, in_process_model, tmp_path, monkeypatch):
    config = FitConfig.from_dict({**CONFIG, "cluster": {**CONFIG["cluster"], "checkpoint": str(tmp_path / "partial")}})
    calls = []
    built = tasks.design_triangle

    def failing_after_three(*arguments):
        if len(calls) == 3:
            raise KeyboardInterrupt("interrupted")
        calls.append(1)
        return built(*arguments)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(tasks, "design_triangle", failing_after_three)
        with pytest.raises(KeyboardInterrupt):
            quiet_fit(ExtxyzSource(train_file), config)
        kept = os.listdir(tmp_path / "partial")
        assert len(kept) == 3 and all(name.endswith(".pt") for name in kept)

        def counting(*arguments):
            calls.append(1)
            return built(*arguments)

        calls.clear()
        monkeypatch.setattr(tasks, "design_triangle", counting)
        resumed = quiet_fit(ExtxyzSource(train_file), config)
        rebuilt = len(calls)
        calls.clear()
        quiet_fit(ExtxyzSource(train_file), FitConfig.from_dict(CONFIG))
        assert rebuilt == len(calls) - 3  # the three kept triangles were read, not rebuilt
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(resumed, in_process_model)
    tasks.discard_kept(str(tmp_path / "partial"))
    assert not (tmp_path / "partial").exists()


class DyingSource(MemorySource):
    """Structures whose reading kills the worker process that reads them (never this process)."""

    def read(self, positions):
        try:
            distributed.get_worker()
        except ValueError:  # not in a worker
            return super().read(positions)
        os._exit(1)


def test_a_cluster_that_keeps_losing_its_workers_is_one_clear_error():
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with DaskExecutor(workers=1) as dying:
            with pytest.raises(ClusterError, match=r"could not complete on the Dask cluster \(survey: KilledWorker.*nothing of this step is kept"):
                quiet_fit(DyingSource(copper_frames(4)), FitConfig.from_dict(CONFIG), executor=dying)


def test_bad_structures_are_reported_from_the_workers_as_in_one_process(tmp_path, executor):
    frames = copper_frames(6)
    frames[4].positions[1] = frames[4].positions[0] + 0.01
    path = tmp_path / "overlapping.extxyz"
    ase.io.write(str(path), frames)
    with pytest.raises(StructureError, match=r"structure 4 \(Cu8\): atoms 0 and 1 are .* apart \(overlapping atoms"):
        quiet_fit(ExtxyzSource(str(path)), FitConfig.from_dict(CONFIG), executor=executor)


def driver_memory_growth(path: str, executor, config: FitConfig) -> float:
    """Peak resident memory of this process above its level before a distributed fit, in MB."""
    page = os.sysconf("SC_PAGE_SIZE") / 1e6

    def resident() -> float:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * page

    start, peak, running = resident(), [0.0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], resident())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    quiet_fit(ExtxyzSource(path), config, executor=executor)
    running[0] = False
    sampler.join()
    return peak[0] - start


def test_the_driver_memory_does_not_grow_with_the_number_of_structures(tmp_path, executor, train_file):
    large = tmp_path / "large.extxyz"
    frames = copper_frames(480, seed=1)
    ase.io.write(str(large), frames)
    config = FitConfig.from_dict({**CONFIG, "options": {"tune": False, "design_memory": 1e-3}, "sparse": {"n": 32, "candidates": 400},
                                  "cluster": {"task_memory": 2e-3}})
    driver_memory_growth(train_file, executor, config)  # first-use allocations, not counted
    small_growth = driver_memory_growth(train_file, executor, config)
    large_growth = driver_memory_growth(str(large), executor, config)
    # what holding the rows of every structure of the large set would cost (3 kernel pieces, 32 sparse environments)
    held = 8 * 3 * 32 * len(frames) * (1 + 3 * 8 + 6) / 1e6
    assert held > 10.0
    assert large_growth < small_growth + 0.5 * held, (small_growth, large_growth, held)


def test_tree_reduce_merges_in_one_fixed_tree():
    def merged(n):
        return tree_reduce(map(str, range(n)), lambda a, b: f"({a} {b})")

    assert merged(1) == "0" and merged(2) == "(0 1)" and merged(4) == "((0 1) (2 3))"
    assert merged(5) == "(((0 1) (2 3)) 4)"
    assert merged(7) == "(((0 1) (2 3)) ((4 5) 6))"
    assert tree_reduce([], lambda a, b: a) is None


def test_the_file_source_reads_the_frames_ase_reads(train_file):
    source = ExtxyzSource(train_file)
    frames = ase.io.read(train_file, ":")
    assert len(source) == len(frames)
    for structure in source.read([7, 2, 23]):
        reference = frames[structure.index]
        np.testing.assert_array_equal(structure.atoms.positions, reference.positions)
        assert structure.energy == reference.get_potential_energy()
        np.testing.assert_array_equal(structure.forces, reference.get_forces())


@pytest.mark.parametrize("content, message", [
    ("", "the file is empty"),
    ("3\ncomment\nCu 0 0 0\n", "not a readable extxyz file: frame 0 has fewer than 3 atoms .*truncated"),
    ("not a count\nx\n", "not a readable extxyz file"),
])
def test_the_file_source_names_what_is_wrong_with_the_file(tmp_path, content, message):
    path = tmp_path / "bad.extxyz"
    path.write_text(content)
    with pytest.raises(DataFileError, match=f"bad.extxyz: {message}"):
        ExtxyzSource(str(path))
    with pytest.raises(DataFileError, match="no such file"):
        ExtxyzSource(str(tmp_path / "missing.extxyz"))


def test_the_command_line_fits_on_a_local_cluster(train_file, tmp_path, capsys):
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "options": {"tune": False}}))
    output = tmp_path / "model.pt"
    code = main(["fit", train_file, "-o", str(output), "--config", str(config), "--workers", "2", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fitted on a local cluster of 2 worker(s)" in printed and "train" in printed
    assert output.exists() and output.with_suffix(".report.yaml").exists()
    assert not output.with_suffix(".partial").exists()
    used = yaml.safe_load(output.with_suffix(".config.yaml").read_text())
    assert used["cluster"]["workers"] == 2
