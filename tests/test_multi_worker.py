"""Several workers saving one checkpoint (behaviours 60-61): each writes its share, the chief merges.

Workers are played by threads of this process and by separate processes; every check reads the
result through the public readers (restore, verify, list_variables) and the files on disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import naming
from asyncckpt import io as ckio
from asyncckpt.io import coordination
from asyncckpt.format import parse_manifest, seal_manifest
from asyncckpt.naming import index_path
from asyncckpt.io.storage import FileStorage
from asyncckpt.io.storage.base import BackendWrapper
from asyncckpt.testing.storage import WrappingStorage

from _fakes import manifest_editor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 120.0  # seconds; only against a hang, never a performance limit


# ------------------------------------------------------------------------------------------------
# The model every worker builds alike


def build(seed: int = 7) -> ac.Checkpoint:
    """A small model of mixed sizes and dtypes: identical on every worker for the same seed."""
    rng = np.random.default_rng(seed)
    model = ac.Module()
    model.big = ac.Variable(rng.standard_normal((128, 96)).astype(np.float32))
    model.mid = ac.Variable(rng.standard_normal(2000))
    model.small = [ac.Variable(rng.integers(0, 1000, size=n).astype(np.int32)) for n in (3, 50, 7, 400, 1)]
    model.flags = ac.Variable(rng.integers(0, 2, size=33).astype(bool))
    model.empty = ac.Variable(np.zeros((0, 4), np.float16))
    return ac.Checkpoint(model=model)


def values(checkpoint: ac.Checkpoint) -> dict[str, np.ndarray]:
    model = checkpoint.model
    found = {"big": model.big.numpy(), "mid": model.mid.numpy(), "flags": model.flags.numpy(),
             "empty": model.empty.numpy()}
    found.update({f"small{i}": v.numpy() for i, v in enumerate(model.small)})
    return found


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


def options(index: int, count: int, timeout: float = 60.0, *, check_locks: bool = True, **kwargs) -> ac.CheckpointOptions:
    worker = ac.MultiWorker(index, count, timeout_seconds=timeout, check_locks=check_locks)
    return ac.CheckpointOptions(multi_worker=worker, **kwargs)


def run_workers(count: int, work) -> list:
    """Run ``work(index)`` for every worker in its own thread; results (or exceptions) by index."""
    results: list = [None] * count

    def body(index: int) -> None:
        try:
            results[index] = work(index)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[index] = exc

    threads = [threading.Thread(target=body, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD)
        assert not thread.is_alive(), "a worker hung"
    return results


def check_checkpoint(path: str, count: int) -> None:
    """Restores bit-exactly, verifies, lists; each data directory holds exactly its worker's share."""
    listed = dict(ac.list_variables(path))
    restored = build(seed=99)
    status = restored.restore(path)
    if "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in listed:
        status.assert_consumed()
    else:  # written by write(): no save_counter in the checkpoint
        status.expect_partial()
    assert_same(values(restored), values(build()))
    reader = ckio.open_reader(path)
    report = reader.verify()
    assert report.tensors == len(reader.keys()) - 1
    assert listed["model/big/.ATTRIBUTES/VARIABLE_VALUE"] == [128, 96]
    assert len(reader.data_dirs) == count
    manifest = parse_manifest(Path(index_path(path)).read_bytes(), source=path)
    owners = coordination.assign([(key, rec.nbytes) for key, rec in manifest.tensors.items()], count)
    folder = Path(path).parent
    for worker, data_dir in enumerate(manifest.all_data_dirs):
        mine = {key for key, rec in manifest.tensors.items() if owners[key] == worker}
        in_dir = {key for key, rec in manifest.tensors.items() if any(e.dir == worker for e in rec.extents)}
        assert in_dir <= mine  # an empty value has no extents
        share = sum(manifest.tensors[key].nbytes for key in mine)
        on_disk = sum(f.stat().st_size for f in (folder / data_dir).iterdir())
        assert on_disk == share, (worker, on_disk, share)
    total = sum(rec.nbytes for rec in manifest.tensors.values())
    biggest = max(rec.nbytes for rec in manifest.tensors.values())
    for data_dir in manifest.all_data_dirs:  # each worker wrote about 1/count of the bytes
        assert sum(f.stat().st_size for f in (folder / data_dir).iterdir()) <= total / count + biggest
    leftovers = [name for name in os.listdir(folder)
                 if ".section-" in name or (".data-" in name and name.endswith(".lock")) or ".tmp-" in name]
    assert leftovers == []


# ------------------------------------------------------------------------------------------------
# The pure parts


def test_assignment_is_deterministic_complete_and_balanced():
    rng = random.Random(3)
    sizes = [(f"k{i}", rng.choice([0, 1, 8, 100, 4096, 70000, rng.randrange(1, 10**6)])) for i in range(300)]
    for count in (1, 2, 3, 7):
        owners = coordination.assign(sizes, count)
        shuffled = sizes[:]
        rng.shuffle(shuffled)
        assert coordination.assign(shuffled, count) == owners  # order of the input does not matter
        assert owners.keys() == {key for key, _ in sizes}
        assert set(owners.values()) <= set(range(count))
        loads = [sum(n for key, n in sizes if owners[key] == w) for w in range(count)]
        assert max(loads) - min(loads) <= max(n for _, n in sizes)
    assert set(coordination.assign(sizes, 1).values()) == {0}


def test_multi_worker_validates_its_fields():
    assert ac.MultiWorker(2, 3).is_chief is False and ac.MultiWorker(0, 1).is_chief
    for bad in [dict(index=3, count=3), dict(index=-1, count=2), dict(index=0, count=0),
                dict(index=0, count=2.0), dict(index=True, count=2)]:
        with pytest.raises(ValueError, match="MultiWorker"):
            ac.MultiWorker(**bad)
    for timeout in (0, -1, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="timeout_seconds"):
            ac.MultiWorker(0, 2, timeout_seconds=timeout)
    with pytest.raises(TypeError, match="MultiWorker"):
        ac.WriteSettings(multi_worker=(0, 2))
    with pytest.raises(TypeError, match="MultiWorker"):
        ac.CheckpointOptions(multi_worker=(0, 2))
    with pytest.raises(ValueError, match="disagree"):
        build().write("/nonexistent/never", options=ac.CheckpointOptions(
            multi_worker=ac.MultiWorker(0, 2), write_settings=ac.WriteSettings(multi_worker=ac.MultiWorker(1, 2))))


# ------------------------------------------------------------------------------------------------
# Saving together


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("enable_async", [False, True])
def test_workers_as_threads_save_one_checkpoint(tmp_path, count, enable_async):
    def work(index):
        checkpoint = build()
        path = checkpoint.save(str(tmp_path / "ckpt"), options=options(index, count, enable_async=enable_async))
        checkpoint.sync()  # committed once sync returns, on every worker
        assert Path(index_path(path)).exists()
        return path

    paths = run_workers(count, work)
    assert paths == [str(tmp_path / "ckpt-1")] * count, paths
    check_checkpoint(paths[0], count)
    assert ac.latest_checkpoint(str(tmp_path)) == paths[0]  # the chief's state file


_WORKER_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import asyncckpt as ac
from test_multi_worker import build
index, count, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
options = ac.CheckpointOptions(multi_worker=ac.MultiWorker(index, count, timeout_seconds=100))
print(build().save(prefix, options=options))
"""


@pytest.mark.parametrize("count", [2, pytest.param(3, marks=pytest.mark.slow)])  # one interpreter per worker
def test_workers_as_processes_save_one_checkpoint(tmp_path, count):
    script = _WORKER_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i), str(count), str(tmp_path / "ckpt")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
        for i in range(count)
    ]
    outputs = [proc.communicate(timeout=HANG_GUARD) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.strip() == str(tmp_path / "ckpt-1")
    check_checkpoint(str(tmp_path / "ckpt-1"), count)


def test_one_worker_writes_an_ordinary_checkpoint(tmp_path):
    plain = build().write(str(tmp_path / "plain"))
    single = build().write(str(tmp_path / "single"), options=options(0, 1))
    for path in (plain, single):
        document = json.loads(Path(index_path(path)).read_bytes())
        assert "data_dirs" not in document
        assert all("dir" not in e for rec in document["tensors"].values() for e in rec["extents"])
    a = json.loads(Path(index_path(plain)).read_bytes())
    b = json.loads(Path(index_path(single)).read_bytes())
    for document in (a, b):
        del document["manifest_crc32c"], document["data_dir"]
    assert a == b


def test_replacing_a_multi_worker_checkpoint_deletes_every_old_data_directory(tmp_path):
    prefix = str(tmp_path / "ckpt")
    run_workers(3, lambda i: build().write(prefix, options=options(i, 3)))
    old = ckio.open_reader(prefix).data_dirs
    results = run_workers(2, lambda i: build().write(prefix, options=options(i, 2)))
    assert results == [prefix, prefix]
    new = ckio.open_reader(prefix).data_dirs
    assert not set(old) & set(new)
    assert sorted(n for n in os.listdir(tmp_path) if ".data-" in n) == sorted(new)
    check_checkpoint(prefix, 2)
    ac.checkpoint_exists(prefix)
    ckio.delete_checkpoint(prefix)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Failures


def test_a_missing_worker_fails_the_chief_and_the_next_save_cleans_up(tmp_path):
    prefix = str(tmp_path / "ckpt")
    previous = build(seed=1)
    previous.write(prefix)  # an earlier checkpoint at the same path
    with pytest.raises(ac.CheckpointTimeoutError, match=r"worker 2 \(.*ckpt\.index\.section-00002-of-00003-<nonce>\)") as raised:
        run_result = run_workers(2, lambda i: build().write(prefix, options=options(i, 3, timeout=0.5, check_locks=False)))
        raise next(r for r in run_result if isinstance(r, BaseException) and "worker 2 (" in str(r))
    assert "1 of 2 other worker(s)" in str(raised.value)
    # Worker 1 published and gave up waiting for a commit that never came.
    assert isinstance(run_result[1], ac.CheckpointTimeoutError) and "the chief (worker 0)" in str(run_result[1])
    restored = build(seed=5)
    restored.restore(prefix).expect_partial()
    assert_same(values(restored), values(previous))  # the previous checkpoint is untouched
    debris = [n for n in os.listdir(tmp_path) if ".data-" in n and n not in ckio.open_reader(prefix).data_dirs]
    assert debris  # worker 1's data directory, left for cleanup
    # A section left by a crashed worker (its lock no longer held) is debris as well.
    stale = tmp_path / naming.section_name("ckpt", 1, 3, debris[0][-16:])
    stale.write_bytes(seal_manifest({"format": "asyncckpt-section", "format_version": 1, "worker": 1, "count": 3,
                                     "save_id": "x", "data_dir": debris[0], "tensors": {}}))
    assert run_workers(3, lambda i: build().write(prefix, options=options(i, 3))) == [prefix] * 3
    check_checkpoint(prefix, 3)
    referenced = set(ckio.open_reader(prefix).data_dirs)
    assert {n for n in os.listdir(tmp_path) if ".data-" in n} == referenced
    assert not stale.exists()


def test_a_chief_that_never_commits_leaves_no_checkpoint(tmp_path):
    prefix = str(tmp_path / "ckpt")
    with pytest.raises(ac.CheckpointTimeoutError, match="the chief"):
        build().write(prefix, options=options(1, 2, timeout=0.3, check_locks=False))
    assert not ac.checkpoint_exists(prefix)
    assert not any(".section-" in n for n in os.listdir(tmp_path))


def test_a_stale_section_of_an_earlier_save_is_not_merged(tmp_path):
    prefix = str(tmp_path / "ckpt")
    copied = {}

    def copy_section():
        deadline = time.monotonic() + HANG_GUARD
        while "bytes" not in copied and time.monotonic() < deadline:
            try:
                section = next(tmp_path.glob("ckpt.index.section-00001-of-00002-*"))
                copied["bytes"] = section.read_bytes()
                copied["path"] = section
            except (StopIteration, FileNotFoundError):
                time.sleep(0.01)

    copier = threading.Thread(target=copy_section)
    copier.start()
    # Worker 1 of an earlier save publishes, then gives up: its section is stale from then on.
    with pytest.raises(ac.CheckpointTimeoutError):
        build().write(prefix, options=options(1, 2, timeout=1.0, check_locks=False))
    copier.join(HANG_GUARD)
    copied["path"].write_bytes(copied["bytes"])  # as a crash after publishing would have left it
    # Same save identifier (same name, same keys), but its writer no longer holds the data
    # directory: the chief waits past it and commits nothing.
    with pytest.raises(ac.CheckpointTimeoutError, match="worker 1"):
        build().write(prefix, options=options(0, 2, timeout=0.5, check_locks=False))
    assert not ac.checkpoint_exists(prefix)
    # A section of another save (other keys) is not taken for this one either, even while live.
    other = ac.Checkpoint(v=ac.Variable(np.ones(3)))
    results = run_workers(2, lambda i: (other if i == 1 else build()).write(
        prefix, options=options(i, 2, timeout=0.5, check_locks=False)))
    assert all(isinstance(r, ac.CheckpointTimeoutError) for r in results), results
    assert not ac.checkpoint_exists(prefix)
    # And a proper save afterwards cleans it all up.
    run_workers(2, lambda i: build().write(prefix, options=options(i, 2)))
    check_checkpoint(prefix, 2)


# ------------------------------------------------------------------------------------------------
# The merged manifest is untrusted input


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merged")
    prefix = str(folder / "ckpt")
    run_workers(2, lambda i: build().write(prefix, options=options(i, 2)))
    return folder, json.loads(Path(index_path(prefix)).read_bytes())


@pytest.fixture
def hostile(merged, tmp_path):
    return manifest_editor(*merged, tmp_path)


def _second_dir_extent(document):
    return next(e for rec in document["tensors"].values() for e in rec["extents"] if e.get("dir") == 1)


def _edit_extent(field, value):
    def edit(document):
        _second_dir_extent(document)[field] = value
    return edit


def _edit_dirs(value):
    def edit(document):
        document["data_dirs"] = value(document)
    return edit


HOSTILE = [
    ("dir-out-of-range", _edit_extent("dir", 2), "names data directory 2"),
    ("dir-negative", _edit_extent("dir", -1), "names data directory -1"),
    ("dir-bool", _edit_extent("dir", True), "names data directory True"),
    ("dir-float", _edit_extent("dir", 1.0), "names data directory 1.0"),
    ("data-dirs-parent", _edit_dirs(lambda d: [d["data_dir"], "../elsewhere"]), "not a plain directory name"),
    ("data-dirs-absolute", _edit_dirs(lambda d: [d["data_dir"], "/etc"]), "not a plain directory name"),
    ("data-dirs-not-list", _edit_dirs(lambda d: d["data_dir"]), "data_dirs must be a list"),
    ("data-dirs-empty", _edit_dirs(lambda d: []), "data_dirs must be a list"),
    ("data-dirs-twice", _edit_dirs(lambda d: [d["data_dir"], d["data_dir"]]), "names a directory twice"),
    ("data-dirs-first", _edit_dirs(lambda d: d["data_dirs"][::-1]), "must begin with data_dir"),
    ("dir-without-data-dirs", lambda d: d.pop("data_dirs"), "names data directory 1"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_merged_manifest_is_refused(hostile, edit, message):
    write, _ = hostile
    prefix = write(edit)
    with pytest.raises(ac.CorruptCheckpointError, match=message):
        build(seed=3).restore(prefix)
    with pytest.raises(ac.CorruptCheckpointError, match=message):
        ckio.open_reader(prefix).verify()


def test_an_extent_in_a_data_directory_linked_outside_is_refused(hostile, tmp_path):
    write, document = hostile
    prefix = write(lambda d: None)
    second = Path(prefix).parent / document["data_dirs"][1]
    outside = tmp_path / "outside"
    shutil.move(str(second), str(outside))
    second.symlink_to(outside)
    with pytest.raises(ac.CorruptCheckpointError, match="symbolic link"):
        ckio.open_reader(prefix)
    with pytest.raises(ac.CorruptCheckpointError, match="symbolic link"):
        build(seed=3).restore(prefix)


def test_a_damaged_extent_in_a_second_directory_is_named(hostile):
    write, document = hostile
    prefix = write(lambda d: None)
    extent = _second_dir_extent(document)
    path = Path(prefix).parent / document["data_dirs"][1] / extent["file"]
    data = bytearray(path.read_bytes())
    data[extent["offset"]] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ac.CorruptCheckpointError, match=document["data_dirs"][1]):
        ckio.open_reader(prefix).verify()


def test_a_hostile_section_is_refused_by_the_chief(tmp_path):
    prefix = str(tmp_path / "ckpt")
    section = tmp_path / naming.section_name("ckpt", 1, 2, "0" * 16)
    # A section naming a data directory of another checkpoint, with the right save_id, is refused
    # as soon as the chief finds it (checked before its writer's liveness).
    team_id = coordination.save_id(
        "ckpt", 2, [(s.key, s.dtype, s.shape, s.nbytes) for s in build()._prepare_write(ac.WriteSettings()).sources],
        "absent",
    )
    section.write_bytes(seal_manifest({"format": "asyncckpt-section", "format_version": 1, "worker": 1, "count": 2,
                                       "save_id": team_id, "data_dir": "other.data-0000000000000000",
                                       "tensors": {}}))
    # Its "writer" holds the lock of the directory it names, so cleanup leaves it for the chief.
    fd = os.open(tmp_path / "ckpt.data-0000000000000000.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ac.CorruptCheckpointError, match="not a data directory of checkpoint 'ckpt'"):
            build().write(prefix, options=options(0, 2, timeout=HANG_GUARD, check_locks=False))
    finally:
        os.close(fd)
    assert not ac.checkpoint_exists(prefix)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ckpt.data-") and n != "ckpt.data-0000000000000000.lock"]


# ------------------------------------------------------------------------------------------------
# CheckpointManager


def test_only_the_chief_manager_keeps_the_books(tmp_path):
    directory = str(tmp_path / "run")

    def work(index):
        checkpoint = build()
        # Different bookkeeping on purpose: only the chief's may reach the disk.
        manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=1 if index == 0 else 3)
        saved = [manager.save(options=options(index, 2, timeout=5)) for _ in range(3)]
        return saved, manager.latest_checkpoint, manager.checkpoints

    results = run_workers(2, work)
    assert not any(isinstance(r, BaseException) for r in results), results
    (chief_saved, chief_latest, chief_kept), (other_saved, other_latest, other_kept) = results
    assert chief_saved == other_saved == [os.path.join(directory, f"ckpt-{n}") for n in (1, 2, 3)]
    assert chief_latest == other_latest == chief_saved[-1]
    assert chief_kept == chief_saved[-1:] and other_kept == other_saved  # each side's own view
    state = ac.get_checkpoint_state(directory)
    assert list(state.all_model_checkpoint_paths) == chief_saved[-1:]  # the chief's max_to_keep=1
    assert ac.latest_checkpoint(directory) == chief_saved[-1]
    assert not ac.checkpoint_exists(chief_saved[0]) and not ac.checkpoint_exists(chief_saved[1])
    names = os.listdir(directory)
    assert not any(n.startswith(("ckpt-1.", "ckpt-2.")) for n in names), names
    restored = build(seed=11)
    restored.restore(ac.latest_checkpoint(directory)).assert_consumed()
    assert_same(values(restored), values(build()))


# ------------------------------------------------------------------------------------------------
# Claims, stale sections, cleanup races


def _specs():
    return [(s.key, s.dtype, s.shape, s.nbytes) for s in build()._prepare_write(ac.WriteSettings()).sources]


def test_a_rewrite_of_one_path_has_its_own_save_identifier_and_new_values(tmp_path):
    # What P.index held when the save began is part of the identifier: a section left by the
    # previous write to the same path (same keys) is never taken for the next one.
    assert coordination.save_id("ckpt", 2, _specs(), "absent") != coordination.save_id("ckpt", 2, _specs(), "ab12")
    prefix = str(tmp_path / "ckpt")

    def work(index):
        checkpoint = build()
        checkpoint.write(prefix, options=options(index, 2))
        checkpoint.model.big.assign(np.full((128, 96), 2.0, np.float32))
        checkpoint.model.mid.assign(np.full(2000, 2.0))
        return checkpoint.write(prefix, options=options(index, 2))

    assert run_workers(2, work) == [prefix] * 2
    reader = ckio.open_reader(prefix)
    assert set(np.unique(reader.read("model/big/.ATTRIBUTES/VARIABLE_VALUE"))) == {2.0}
    assert set(np.unique(reader.read("model/mid/.ATTRIBUTES/VARIABLE_VALUE"))) == {2.0}


def test_a_section_naming_a_directory_already_in_the_checkpoint_is_refused():
    from asyncckpt.format import Extent, Section, TensorRecord
    record = TensorRecord("float64", (2,), 16, 0, (Extent("pack-00000", 0, 16, 0),))
    expected = {"b": TensorRecord("float64", (2,), 16, 0, ())}
    chief_dir = "p.data-" + "a" * 16
    section = Section(1, 2, "x", chief_dir, {"b": record})
    with pytest.raises(ac.CorruptCheckpointError, match="already named by the checkpoint"):
        coordination.check_section(section, source="s", worker=1, stem="p", expected=expected,
                                   nonce="a" * 16, taken={chief_dir})
    with pytest.raises(ac.CorruptCheckpointError, match="not the one its file name gives"):
        coordination.check_section(section, source="s", worker=1, stem="p", expected=expected, nonce="b" * 16)


async def _backend(folder):
    from asyncckpt.io.storage import default_storage

    backend = await default_storage().open(str(folder))
    await backend.prepare()
    return backend


def test_cleanup_leaves_a_live_workers_section_and_removes_a_dead_ones(tmp_path):
    import asyncio
    from asyncckpt.format import Section
    from asyncckpt.naming import data_dir_name, index_tmp_name, lock_name

    async def scenario():
        backend = await _backend(tmp_path)
        dead, live = "0" * 16, "f" * 16
        await backend.create_data_dir(data_dir_name("p", dead))
        stale = naming.section_name("p", 1, 2, dead)
        await backend.commit(stale, index_tmp_name("p", dead), Section(1, 2, "old", data_dir_name("p", dead), {}).to_json())
        live_lock = await backend.lock_new(lock_name("p", live))
        await backend.create_data_dir(data_dir_name("p", live))
        fresh = naming.section_name("p", 1, 2, live)
        await backend.commit(fresh, index_tmp_name("p", live), Section(1, 2, "new", data_dir_name("p", live), {}).to_json())
        await ckio.commit.clean_debris(backend, exclude="none")
        names = await backend.list_names()
        await live_lock.release()
        return names

    names = asyncio.run(scenario())
    assert naming.section_name("p", 1, 2, "f" * 16) in names and "p.data-" + "f" * 16 in names
    assert naming.section_name("p", 1, 2, "0" * 16) not in names and "p.data-" + "0" * 16 not in names


def test_a_claimed_directory_of_a_dead_worker_survives_cleanup_while_its_chief_lives(tmp_path):
    import asyncio
    from asyncckpt.naming import data_dir_name, lock_name

    async def scenario():
        backend = await _backend(tmp_path)
        chief, worker = "c" * 16, "d" * 16
        chief_lock = await backend.lock_new(lock_name("p", chief))
        await backend.create_data_dir(data_dir_name("p", chief))
        await backend.create_data_dir(data_dir_name("p", worker))  # its writer died: no lock held
        await backend.write(data_dir_name("p", worker) + "/pack-00000", b"x" * 8)
        claim = naming.claim_name("p", chief, worker)
        await backend.write(claim, b"{}")
        await ckio.commit.clean_debris(backend, exclude="none")
        kept = await backend.list_names()
        await chief_lock.release()  # the chief is gone without committing: all of it is debris now
        await ckio.commit.clean_debris(backend, exclude="none")
        return kept, await backend.list_names()

    kept, after = asyncio.run(scenario())
    assert {"p.data-" + "d" * 16, naming.claim_name("p", "c" * 16, "d" * 16)} <= kept
    assert not any(name.startswith("p.") for name in after), after


def test_a_worker_killed_after_its_section_was_claimed_still_lands_in_the_checkpoint(tmp_path):
    script = ROOT / "tests" / "_kill_after_claim.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=HANG_GUARD, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = str(tmp_path / "p")
    reader = ckio.open_reader(prefix)
    assert reader.verify().tensors == 3 and len(reader.data_dirs) == 3


class _LocksThatDoNotExclude(WrappingStorage):
    """Locks that every worker gets, as on NFS mounted with ``nolock``: each host sees only its own."""

    def __init__(self) -> None:
        super().__init__(FileStorage(), self._wrap)

    @staticmethod
    def _wrap(backend):
        class Local(BackendWrapper):
            async def try_lock(self, name):
                taken = await super().try_lock(name)
                return taken if taken is not None else _NoLock()

        return Local(backend)


class _NoLock:
    async def release(self) -> None:
        pass


def test_locks_that_do_not_exclude_across_workers_fail_every_save_at_once_saying_so(tmp_path):
    prefix = str(tmp_path / "ckpt")
    storage = _LocksThatDoNotExclude()
    started = time.monotonic()
    results = run_workers(3, lambda i: build().write(
        prefix, options=options(i, 3, timeout=HANG_GUARD, write_settings=ac.WriteSettings(storage=storage))))
    assert time.monotonic() - started < HANG_GUARD / 2  # not after waiting out the timeout
    for result in results:
        assert isinstance(result, ac.CheckpointError) and "do not exclude across the workers" in str(result), result
        assert "MultiWorker.of(TorchDistributedCoordinator())" in str(result)
    assert not ac.checkpoint_exists(prefix)
    assert not [name for name in os.listdir(tmp_path) if ".probe-" in name]


def test_a_save_whose_locks_exclude_leaves_no_probe_behind(tmp_path):
    prefix = str(tmp_path / "ckpt")
    assert run_workers(2, lambda i: build().write(prefix, options=options(i, 2))) == [prefix] * 2
    assert not [name for name in os.listdir(tmp_path) if ".probe-" in name]
