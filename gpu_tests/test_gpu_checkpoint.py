"""Checkpoints of CuPy variables end to end: dtypes, consistency, async saves, optimizers, deferred restore.

The format is device-independent: a checkpoint saved from the GPU restores into NumPy variables and
the reverse; these tests check both directions.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import optimizers

from _samples import DTYPES, sample  # tests/_samples.py, on the path through conftest.py

ASYNC = ac.CheckpointOptions(enable_async=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0, 3), (7,), (3, 4, 5)], ids=["0d", "empty", "1d", "3d"])
def test_every_dtype_round_trips_on_the_device(cp, prefix, dtype, shape):
    saved = sample(dtype, shape)
    variable = ac.Variable(cp.asarray(saved))
    assert variable.device == "cuda:0"
    path = ac.Checkpoint(v=variable).save(prefix)
    restored = ac.Variable(cp.zeros(shape, dtype=dtype))
    ac.Checkpoint(v=restored).restore(path).assert_consumed()
    assert isinstance(restored.array, cp.ndarray)
    np.testing.assert_array_equal(restored.numpy(), saved)
    on_host = ac.Variable(np.zeros(shape, dtype=dtype))  # GPU -> CPU
    ac.Checkpoint(v=on_host).restore(path).assert_consumed()
    np.testing.assert_array_equal(on_host.numpy(), saved)


def test_bfloat16_round_trips_on_the_device_where_cupy_has_it(cp, prefix):
    try:
        cp.zeros(1, dtype=ml_dtypes.bfloat16)
    except Exception as exc:  # older CuPy has no bfloat16; newer CuPy takes ml_dtypes' own
        pytest.skip(f"CuPy {cp.__version__} cannot hold bfloat16 arrays: {exc}")
    saved = np.random.default_rng(0).integers(0, 1 << 16, 300, dtype=np.uint16).view(ml_dtypes.bfloat16)
    path = ac.Checkpoint(v=ac.Variable(cp.asarray(saved))).save(prefix)
    restored = ac.Variable(cp.zeros(300, dtype=ml_dtypes.bfloat16))
    ac.Checkpoint(v=restored).restore(path).assert_consumed()
    assert isinstance(restored.array, cp.ndarray)
    assert restored.numpy().tobytes() == saved.tobytes()  # bit-exact, NaN payloads included


def test_cpu_checkpoint_restores_onto_the_device(cp, prefix):
    saved = sample("float32", (64, 33))
    path = ac.Checkpoint(v=ac.Variable(saved)).save(prefix)
    restored = ac.Variable(np.zeros_like(saved), device="cuda:0")
    assert isinstance(restored.array, cp.ndarray)
    ac.Checkpoint(v=restored).restore(path).assert_consumed()
    np.testing.assert_array_equal(cp.asnumpy(restored.array), saved)


def test_large_array_in_many_chunks(cp, prefix):
    saved = cp.random.default_rng(2).standard_normal(24 * (1 << 20) // 8)  # 24 MiB
    settings = ac.WriteSettings(chunk_bytes=4 << 20, staging_budget_bytes=8 << 20, pack_bytes=4 << 20)
    options = ac.CheckpointOptions(write_settings=settings)
    path = ac.Checkpoint(big=ac.Variable(saved)).save(prefix, options=options)
    restored = ac.Variable(cp.zeros_like(saved))
    ac.Checkpoint(big=restored).restore(path).assert_consumed()
    assert bool((restored.array == saved).all())


@pytest.mark.parametrize("options", [ac.CheckpointOptions(), ASYNC], ids=["sync", "async"])
def test_kernel_running_at_save_and_mutations_right_after_are_handled(cp, prefix, spin, options):
    variable = ac.Variable(cp.zeros(1 << 18, dtype=cp.float64))
    spin(variable.array, 1.0, milliseconds=300)  # still writing when save() is called
    checkpoint = ac.Checkpoint(v=variable)
    path = checkpoint.save(prefix, options=options)
    for _ in range(3):  # training goes on at once
        variable.assign_add(1.0)
    checkpoint.sync()
    restored = ac.Variable(cp.zeros(1 << 18, dtype=cp.float64))
    ac.Checkpoint(v=restored).restore(path).assert_consumed()
    assert bool((restored.array == 1.0).all())
    assert bool((variable.array == 4.0).all())


def test_asave_captures_after_a_kernel_on_the_callers_non_default_stream(cp, prefix, spin):
    """asave takes its snapshot on the awaiting thread: the capture is ordered after the kernel
    still writing the variable on that thread's current (non-default) stream, and kernels
    enqueued there after asave returned its awaitable do not reach the checkpoint."""
    import asyncio

    variable = ac.Variable(cp.zeros(1 << 18, dtype=cp.float64))
    checkpoint = ac.Checkpoint(v=variable)
    stream = cp.cuda.Stream(non_blocking=True)

    async def train_and_save() -> str:
        with stream:
            spin(variable.array, 7.0, milliseconds=300)  # still running when asave is called
            saving = asyncio.ensure_future(checkpoint.asave(prefix))
            await asyncio.sleep(0)  # asave has taken its snapshot: it ran up to its first await
            cp.add(variable.array, 100.0, out=variable.array)  # a later kernel on the same stream
            return await saving

    path = asyncio.run(train_and_save())
    stream.synchronize()
    restored = ac.Variable(cp.zeros(1 << 18, dtype=cp.float64))
    ac.Checkpoint(v=restored).restore(path).assert_consumed()
    assert bool((restored.array == 7.0).all())
    assert bool((variable.array == 107.0).all())


@pytest.mark.parametrize("options", [ac.CheckpointOptions(), ASYNC], ids=["sync", "async"])
def test_in_place_kernels_after_save_are_not_captured_without_any_mutation_hook(cp, prefix, spin, options):
    """Training kernels write the arrays directly (no Variable method, so no hook): the capture
    taken on the device at save time is what is written."""
    variables = [ac.Variable(cp.zeros(1 << 20, dtype=cp.float64)) for _ in range(3)]  # 8 MiB each
    for index, variable in enumerate(variables):
        spin(variable.array, float(index + 1), milliseconds=100)
    checkpoint = ac.Checkpoint(vs=variables)
    settings = ac.WriteSettings(chunk_bytes=4 << 20, pack_bytes=4 << 20, staging_budget_bytes=4 << 20)
    path = checkpoint.save(prefix, options=ac.CheckpointOptions(
        enable_async=options.enable_async, write_settings=settings))
    for variable in variables:
        for _ in range(5):
            cp.add(variable.array, 10.0, out=variable.array)  # bypasses the Variable API
    checkpoint.sync()
    restored = [ac.Variable(cp.zeros(1 << 20, dtype=cp.float64)) for _ in range(3)]
    ac.Checkpoint(vs=restored).restore(path).assert_consumed()
    for index, (saved, live) in enumerate(zip(restored, variables)):
        assert bool((saved.array == index + 1).all())
        assert bool((live.array == index + 51).all())


def test_save_stages_device_values_through_the_bounded_pinned_pool(cp, prefix):
    from asyncckpt import _cuda

    variable = ac.Variable(cp.arange(12 << 20, dtype=cp.uint8))  # 12 MiB through a 4 MiB pool
    settings = ac.WriteSettings(chunk_bytes=2 << 20, pack_bytes=2 << 20, staging_budget_bytes=4 << 20)
    stager = _cuda.stager_for(_cuda.cupy_backend(0))
    before = sum(stager.stats[k] for k in ("device_copies", "stream_waits", "host_copies"))
    path = ac.Checkpoint(v=variable).save(prefix, options=ac.CheckpointOptions(write_settings=settings))
    assert sum(stager.stats[k] for k in ("device_copies", "stream_waits", "host_copies")) == before + 1
    assert stager.pool.capacity_bytes == 4 << 20
    assert stager.pool.free_buffers == stager.pool.max_buffers  # all returned once written
    restored = ac.Variable(cp.zeros(12 << 20, dtype=cp.uint8))
    ac.Checkpoint(v=restored).restore(path).assert_consumed()
    assert bool((restored.array == variable.array).all())
    stager.set_pinned_bytes(_cuda.DEFAULT_PINNED_BYTES)


def test_async_saves_keep_each_value_while_training_goes_on(cp, prefix):
    variable = ac.Variable(cp.arange(1000, dtype=cp.float32))
    checkpoint = ac.Checkpoint(w=variable)
    first = checkpoint.save(prefix, options=ASYNC)
    variable.assign(cp.full(1000, -1, cp.float32))
    second = checkpoint.save(prefix, options=ASYNC)
    variable.assign_add(cp.ones(1000, cp.float32))
    checkpoint.sync()
    for path, expected in ((first, np.arange(1000, dtype=np.float32)), (second, np.full(1000, -1, np.float32))):
        target = ac.Variable(cp.zeros(1000, cp.float32))
        ac.Checkpoint(w=target).restore(path).assert_existing_objects_matched()
        np.testing.assert_array_equal(target.numpy(), expected)


def train(optimizer, variable, cp, steps, seed):
    rng = cp.random.default_rng(seed)
    for _ in range(steps):
        optimizer.apply_gradients([(rng.standard_normal(variable.shape, dtype=cp.float32), variable)])


@pytest.mark.parametrize(
    "make_optimizer, slots",
    [(lambda: optimizers.SGD(0.1, momentum=0.9), ("momentum",)), (lambda: optimizers.Adam(0.01), ("m", "v"))],
    ids=["sgd-momentum", "adam"],
)
def test_optimizer_slots_on_the_device_save_and_restore(cp, prefix, make_optimizer, slots):
    variable = ac.Variable(cp.ones((16, 8), cp.float32), name="w")
    optimizer = make_optimizer()
    train(optimizer, variable, cp, steps=4, seed=0)
    for slot in slots:
        assert optimizer.get_slot(variable, slot).device == "cuda:0"
    path = ac.Checkpoint(v=variable, opt=optimizer).save(prefix)

    restored_variable = ac.Variable(cp.zeros((16, 8), cp.float32), name="w")
    restored_optimizer = make_optimizer()
    status = ac.Checkpoint(v=restored_variable, opt=restored_optimizer).restore(path)
    train(restored_optimizer, restored_variable, cp, steps=1, seed=1)  # creates the slots: deferred restore
    status.assert_consumed()
    train(optimizer, variable, cp, steps=1, seed=1)
    for slot in slots:
        restored_slot = restored_optimizer.get_slot(restored_variable, slot)
        assert restored_slot.device == "cuda:0" and isinstance(restored_slot.array, cp.ndarray)
        np.testing.assert_allclose(restored_slot.numpy(), optimizer.get_slot(variable, slot).numpy(), rtol=1e-6)
    np.testing.assert_allclose(restored_variable.numpy(), variable.numpy(), rtol=1e-6)
    assert int(restored_optimizer.iterations) == 5


def test_deferred_restore_creates_device_variables(cp, prefix):
    root = ac.Module()
    ac.add_variable(root, "w", initializer=np.arange(6, dtype=np.float32).reshape(2, 3), device="cuda:0")
    path = ac.Checkpoint(root=root).save(prefix)
    fresh = ac.Module()
    ac.Checkpoint(root=fresh).restore(path)
    created = ac.add_variable(fresh, "w", shape=(2, 3), dtype=np.float32, device="cuda:0")  # restore-on-create
    assert created.device == "cuda:0" and isinstance(created.array, cp.ndarray)
    np.testing.assert_array_equal(created.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_variable_operations_on_the_device(cp):
    v = ac.Variable(np.arange(4, dtype=np.float32), device="cuda:0")
    assert v.device == "cuda:0" and isinstance(v.array, cp.ndarray)
    v.assign([1, 2, 3, 4])
    v.assign_add(cp.ones(4, cp.float32))
    v.assign_sub(np.full(4, 0.5, np.float32))
    np.testing.assert_array_equal(v.numpy(), [1.5, 2.5, 3.5, 4.5])
    assert isinstance(v.value(), cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(v + 1), [2.5, 3.5, 4.5, 5.5])
    with pytest.raises(ValueError, match="shape"):
        v.assign(cp.zeros(5, cp.float32))
