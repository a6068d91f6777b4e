"""Checkpoint end to end on the real pipeline: dtypes, big arrays, async snapshots, errors, threads, asyncio."""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import threading

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt._runtime import Runtime
from asyncckpt.io.storage import FileStorage

sys.path.insert(0, os.path.dirname(__file__))
from _fakes import FailingStorage, GatedStorage  # noqa: E402
from _samples import sample  # noqa: E402

DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
]
ASYNC = ac.CheckpointOptions(enable_async=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(), (0, 3), (7,), (3, 4, 5)], ids=["0d", "empty", "1d", "3d"])
def test_every_dtype_and_shape_round_trips(tmp_path, dtype, shape):
    saved = sample(dtype, shape)
    path = ac.Checkpoint(v=ac.Variable(saved)).save(tmp_path / "ckpt")
    restored = ac.Variable(np.zeros(shape, dtype=dtype))
    ac.Checkpoint(v=restored).restore(path).assert_consumed()
    assert restored.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(restored.numpy(), saved)


def test_large_array_round_trips_bit_exact(tmp_path):
    saved = np.random.default_rng(1).integers(0, 2**63, size=(130 * 2**20) // 8, dtype=np.int64)
    settings = ac.WriteSettings(chunk_bytes=32 * 2**20, staging_budget_bytes=64 * 2**20)
    options = ac.CheckpointOptions(write_settings=settings)
    path = ac.Checkpoint(big=ac.Variable(saved)).save(tmp_path / "ckpt", options=options)
    restored = ac.Variable(np.zeros_like(saved))
    ac.Checkpoint(big=restored).restore(path).assert_consumed()
    assert np.array_equal(restored.numpy(), saved)


def test_mutation_after_async_save_is_not_written(tmp_path):
    runtime = Runtime()
    try:
        gated = GatedStorage(FileStorage(), runtime)
        options = ac.CheckpointOptions(
            enable_async=True, write_settings=ac.WriteSettings(storage=gated, runtime=runtime)
        )
        variable = ac.Variable(np.arange(1000, dtype=np.float32))
        checkpoint = ac.Checkpoint(v=variable)
        path = checkpoint.save(tmp_path / "ckpt", options=options)
        assert gated.reached.wait(30), "the writer never reached storage"
        for step in range(5):  # the training loop goes on while the write is held open
            variable.assign_add(1.0)
        gated.open_gate()
        checkpoint.sync()
        restored = ac.Variable(np.zeros(1000, np.float32))
        ac.Checkpoint(v=restored).read(path)
        np.testing.assert_array_equal(restored.numpy(), np.arange(1000, dtype=np.float32))
        np.testing.assert_array_equal(variable.numpy(), np.arange(1000, dtype=np.float32) + 5)
    finally:
        runtime.close()


def test_background_error_surfaces_through_sync_once_and_earlier_checkpoint_survives(tmp_path):
    variable = ac.Variable(np.ones(10, np.float32))
    checkpoint = ac.Checkpoint(v=variable)
    first = checkpoint.save(tmp_path / "ckpt")
    failing = FailingStorage(FileStorage(), fail_on=1)
    options = ac.CheckpointOptions(enable_async=True, write_settings=ac.WriteSettings(storage=failing))
    variable.assign(np.full(10, 2.0, np.float32))
    second = checkpoint.save(tmp_path / "ckpt", options=options)
    with pytest.raises(OSError) as raised:
        checkpoint.sync()
    assert raised.value.errno == errno.ENOSPC
    checkpoint.sync()  # reported once, then cleared
    assert not ac.checkpoint_exists(second)
    assert ac.latest_checkpoint(str(tmp_path)) == first
    restored = ac.Variable(np.zeros(10, np.float32))
    ac.Checkpoint(v=restored).restore(first)
    np.testing.assert_array_equal(restored.numpy(), np.ones(10, np.float32))
    third = checkpoint.save(tmp_path / "ckpt")  # the program carries on once storage is healthy
    assert ac.latest_checkpoint(str(tmp_path)) == third


def test_background_error_is_raised_by_the_next_save(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(1.0))
    failing = FailingStorage(FileStorage(), fail_on=1)
    options = ac.CheckpointOptions(enable_async=True, write_settings=ac.WriteSettings(storage=failing))
    checkpoint.save(tmp_path / "ckpt", options=options)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path / "ckpt")


def test_at_most_one_write_in_flight_per_checkpoint(tmp_path):
    runtime = Runtime()
    try:
        gated = GatedStorage(FileStorage(), runtime)
        options = ac.CheckpointOptions(
            enable_async=True, write_settings=ac.WriteSettings(storage=gated, runtime=runtime)
        )
        checkpoint = ac.Checkpoint(v=ac.Variable(1.0))
        checkpoint.save(tmp_path / "ckpt", options=options)
        assert gated.reached.wait(30)
        second_returned = threading.Event()

        def second_save():
            checkpoint.save(tmp_path / "ckpt", options=options)
            second_returned.set()

        thread = threading.Thread(target=second_save)
        thread.start()
        assert not second_returned.wait(0.5), "a second save started while the first was in flight"
        gated.open_gate()
        thread.join(60)
        assert second_returned.is_set()
        checkpoint.sync()
        assert ac.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")
    finally:
        runtime.close()


def test_restore_waits_for_an_in_flight_write_to_the_same_path(tmp_path):
    runtime = Runtime()
    try:
        gated = GatedStorage(FileStorage(), runtime)
        options = ac.CheckpointOptions(
            enable_async=True, write_settings=ac.WriteSettings(storage=gated, runtime=runtime)
        )
        saver = ac.Checkpoint(v=ac.Variable(7.0))
        path = saver.save(tmp_path / "ckpt", options=options)
        assert gated.reached.wait(30)
        restored = ac.Variable(0.0)
        done = threading.Event()

        def restore():
            ac.Checkpoint(v=restored).restore(path)
            done.set()

        thread = threading.Thread(target=restore)
        thread.start()
        assert not done.wait(0.5)
        gated.open_gate()
        thread.join(60)
        assert done.is_set() and float(restored) == 7.0
        saver.sync()
    finally:
        runtime.close()


def test_concurrent_saves_from_threads_are_serialised(tmp_path):
    variable = ac.Variable(np.zeros(100, np.float32))
    checkpoint = ac.Checkpoint(v=variable)
    paths, errors = [], []

    def save_many():
        try:
            for _ in range(5):
                paths.append(checkpoint.save(tmp_path / "ckpt", options=ASYNC))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=save_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    checkpoint.sync()
    assert not errors
    assert sorted(paths, key=lambda p: int(p.rsplit("-", 1)[1])) == [f"{tmp_path / 'ckpt'}-{n}" for n in range(1, 21)]
    assert int(checkpoint.save_counter) == 20
    assert all(ac.checkpoint_exists(path) for path in paths)


def test_asave_and_arestore_do_not_block_the_event_loop(tmp_path):
    variable = ac.Variable(np.arange(2**20, dtype=np.float32))
    checkpoint = ac.Checkpoint(v=variable)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        path = await checkpoint.asave(tmp_path / "ckpt")
        ticks_during_save = ticks
        restored = ac.Variable(np.zeros(2**20, np.float32))
        status = await ac.Checkpoint(v=restored).arestore(path)
        stop.set()
        await task
        return path, ticks_during_save, ticks, restored, status

    path, ticks_during_save, ticks, restored, status = asyncio.run(main())
    status.assert_consumed()
    assert ticks_during_save > 0 and ticks > ticks_during_save
    assert ac.latest_checkpoint(str(tmp_path)) == path
    np.testing.assert_array_equal(restored.numpy(), variable.numpy())


class _ThreadRecordingState(ac.PythonState):
    """Records the thread that serialises (the snapshot) and deserialises (the restore) it."""

    def __init__(self, text: str = "") -> None:
        super().__init__()
        self.text = text
        self.threads: list[tuple[str, threading.Thread]] = []

    def serialize(self) -> str:
        self.threads.append(("serialize", threading.current_thread()))
        return self.text

    def deserialize(self, string_value: bytes) -> None:
        self.threads.append(("deserialize", threading.current_thread()))
        self.text = string_value.decode()


def test_asave_snapshots_and_arestore_matches_on_the_awaiting_thread_with_no_worker_thread(tmp_path):
    """The async API is the core, not a thread hop around the blocking one: the snapshot (where a
    device capture is ordered on the current stream) and the restore matching run on the thread
    awaiting them."""
    saved = _ThreadRecordingState("step 7")
    restored = _ThreadRecordingState()

    async def main():
        path = await ac.Checkpoint(state=saved).asave(tmp_path / "ckpt")
        status = await ac.Checkpoint(state=restored).arestore(path)
        return status

    asyncio.run(main()).assert_consumed()
    main_thread = threading.current_thread()
    assert saved.threads == [("serialize", main_thread)]
    assert restored.threads == [("deserialize", main_thread)]
    assert restored.text == "step 7"


def test_arestore_of_a_missing_checkpoint_raises_not_found_naming_it(tmp_path):
    async def main():
        await ac.Checkpoint(v=ac.Variable(1.0)).arestore(str(tmp_path / "absent-3"))

    with pytest.raises(ac.NotFoundError, match="absent-3"):
        asyncio.run(main())


def test_asave_reports_background_errors(tmp_path):
    failing = FailingStorage(FileStorage(), fail_on=1)
    options = ac.CheckpointOptions(write_settings=ac.WriteSettings(storage=failing))
    checkpoint = ac.Checkpoint(v=ac.Variable(1.0))

    async def main():
        await checkpoint.asave(tmp_path / "ckpt", options=options)

    with pytest.raises(OSError):
        asyncio.run(main())


def test_restore_of_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "nothing-1")
    with pytest.raises(ac.NotFoundError, match="nothing-1"):
        ac.Checkpoint(v=ac.Variable(1.0)).restore(missing)
    with pytest.raises(FileNotFoundError):
        ac.Checkpoint(v=ac.Variable(1.0)).read(missing)


def test_dtype_mismatch_names_the_key(tmp_path):
    path = ac.Checkpoint(v=ac.Variable(np.zeros(3, np.float64))).save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="dtype"):
        ac.Checkpoint(v=ac.Variable(np.zeros(3, np.float32))).restore(path)


def test_corrupt_data_is_detected_on_restore(tmp_path):
    path = ac.Checkpoint(v=ac.Variable(np.arange(64, dtype=np.float32))).save(tmp_path / "ckpt")
    data_dir = next(p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("ckpt-1.data"))
    data_file = next(p for p in data_dir.rglob("*") if p.is_file() and p.stat().st_size >= 256)
    raw = bytearray(data_file.read_bytes())
    raw[100] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(ac.CorruptCheckpointError, match="v/.ATTRIBUTES/VARIABLE_VALUE"):
        ac.Checkpoint(v=ac.Variable(np.zeros(64, np.float32))).restore(path)


def test_optimizer_state_survives_a_round_trip(tmp_path):
    def build():
        model = ac.Module()
        model.w = ac.Variable(np.ones((3, 2), np.float32))
        return model, ac.optimizers.Adam(0.1)

    model, optimizer = build()
    for _ in range(3):
        optimizer.apply_gradients([(np.full((3, 2), 0.5, np.float32), model.w)])
    path = ac.Checkpoint(model=model, optimizer=optimizer).save(tmp_path / "ckpt")
    model2, optimizer2 = build()
    status = ac.Checkpoint(model=model2, optimizer=optimizer2).restore(path)
    np.testing.assert_array_equal(model2.w.numpy(), model.w.numpy())
    np.testing.assert_array_equal(optimizer2.get_slot(model2.w, "m").numpy(), optimizer.get_slot(model.w, "m").numpy())
    assert int(optimizer2.iterations) == 3
    optimizer.apply_gradients([(np.full((3, 2), 0.5, np.float32), model.w)])
    optimizer2.apply_gradients([(np.full((3, 2), 0.5, np.float32), model2.w)])
    status.assert_consumed()
    np.testing.assert_allclose(model2.w.numpy(), model.w.numpy())


def test_unsynced_background_error_is_reported_at_interpreter_exit_and_fails_the_process(tmp_path):
    import subprocess
    import textwrap

    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import numpy as np, asyncckpt as ac
        from _fakes import FailingStorage
        from asyncckpt.io.storage import FileStorage
        storage = FailingStorage(FileStorage(), fail_on=1)
        options = ac.CheckpointOptions(enable_async=True, write_settings=ac.WriteSettings(storage=storage))
        ac.Checkpoint(v=ac.Variable(np.ones(4))).save({str(tmp_path / "ckpt")!r}, options=options)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "failed and was never synced" in result.stderr
    assert "No space left on device" in result.stderr
    assert not ac.checkpoint_exists(str(tmp_path / "ckpt-1"))
    # A scheduler must see the failure: the process does not end with status 0, and says why.
    assert result.returncode == 1, result.stderr
    assert "asyncckpt: exiting with status 1" in result.stderr


def test_round_trip_through_tensorstore_file_kvstore(tmp_path):
    """The same layout written and read through TensorStore's own `file` kvstore driver."""
    from asyncckpt.io.storage import KvStoreStorage

    storage = KvStoreStorage({"driver": "file", "path": str(tmp_path) + "/"})
    write = ac.CheckpointOptions(write_settings=ac.WriteSettings(storage=storage, chunk_bytes=2**20,
                                                                 staging_budget_bytes=2**24))
    read = ac.CheckpointOptions(read_settings=ac.ReadSettings(storage=storage))
    saved = np.random.default_rng(3).standard_normal(3 * 2**18).astype(np.float32)  # 3 MiB: several chunks
    small = ac.Variable(np.arange(10, dtype=np.int16))
    path = ac.Checkpoint(big=ac.Variable(saved), small=small).write("run/ckpt", options=write)
    assert (tmp_path / "run" / "ckpt.index").is_file()
    big, small2 = ac.Variable(np.zeros_like(saved)), ac.Variable(np.zeros(10, np.int16))
    ac.Checkpoint(big=big, small=small2).read(path, options=read).assert_consumed()
    np.testing.assert_array_equal(big.numpy(), saved)
    np.testing.assert_array_equal(small2.numpy(), small.numpy())


def test_a_non_trackable_argument_is_refused_with_asyncckpt_advice():
    with pytest.raises(ValueError) as info:
        ac.Checkpoint(step=5)
    message = str(info.value)
    assert message.startswith(
        "`Checkpoint` was expecting step to be a trackable object (an object derived from `Trackable`), got 5."
    )
    assert "asyncckpt.Variable" in message and "PythonState" in message
    assert "TensorFlow" not in message


def test_a_missing_checkpoint_names_its_index_and_says_savedmodels_are_not_read(tmp_path):
    missing = str(tmp_path / "nothing-1")
    with pytest.raises(ac.NotFoundError) as info:
        ac.Checkpoint(v=ac.Variable(1.0)).restore(missing)
    message = str(info.value)
    assert message.startswith(f"Error when restoring from checkpoint or SavedModel at {missing}: ")
    assert f"{missing}.index does not exist" in message
    assert message.endswith("asyncckpt reads asyncckpt checkpoints only, not SavedModel directories.")


def test_the_metrics_callback_sees_each_restore_with_its_bytes_files_and_seconds(tmp_path, caplog):
    import logging

    values = {"a": ac.Variable(np.arange(1000, dtype=np.float64)), "b": ac.Variable(np.ones(3, np.float32))}
    path = ac.Checkpoint(**values).save(str(tmp_path / "ckpt"))
    seen = []
    options = ac.CheckpointOptions(experimental_metrics_callback=seen.append)
    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    ac.Checkpoint(a=ac.Variable(np.zeros(1000)), b=ac.Variable(np.zeros(3, np.float32))).restore(path, options=options)
    (stats,) = seen
    assert type(stats).__name__ == "ReadStats" and stats.path == path and stats.error is None
    assert stats.tensors == 2 and stats.bytes_read == 8000 + 12 and stats.files_read >= 1
    assert 0 <= stats.open_seconds <= stats.total_seconds and 0 <= stats.read_seconds <= stats.total_seconds
    assert f"restore of {path}: 2 values, 8012 bytes" in caplog.text
    with pytest.raises(ValueError):
        ac.Checkpoint(a=ac.Variable(np.zeros(7))).restore(path, options=options)
    assert isinstance(seen[-1].error, ValueError)


def test_each_save_logs_its_figures_at_debug(tmp_path, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    path = ac.Checkpoint(a=ac.Variable(np.ones(100))).save(str(tmp_path / "ckpt"))
    assert f"save of {path}: 2 values, 808 bytes in 1 data files" in caplog.text


def test_a_save_reports_its_progress_file_by_file(tmp_path):
    import io

    from asyncckpt.progress import Progress

    seen = []
    settings = ac.WriteSettings(chunk_bytes=1 << 20, pack_bytes=1 << 20, on_progress=lambda done, total: seen.append(
        (done, total)))
    ac.Checkpoint(v=ac.Variable(np.zeros(3 << 20, np.uint8))).save(
        str(tmp_path / "ckpt"), options=ac.CheckpointOptions(write_settings=settings))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and seen[-1][0] == seen[-1][1]
    assert len(seen) >= 3 and seen[-1][1] == (3 << 20) + 8  # three chunks and the save counter's pack
    stream = io.StringIO()
    line = Progress(stream, "save", interval=0)
    path = ac.Checkpoint(v=ac.Variable(np.zeros(10))).save(
        str(tmp_path / "other"), options=ac.CheckpointOptions(write_settings=ac.WriteSettings(on_progress=line)))
    line.close()
    assert stream.getvalue().endswith("(100%)\n") and ac.checkpoint_exists(path)
    with pytest.raises(TypeError, match="on_progress must be callable"):
        ac.WriteSettings(on_progress=3)
