"""PyTorch models and optimizers, and JAX pytrees, on the GPU through ``Checkpoint``'s framework adapters.

``Checkpoint(model=module, optimizer=optimizer)`` hands each CUDA tensor of the state dicts to the
device capture at ``save()`` (ordered on CuPy's current stream, which is torch's legacy default
stream unless a test makes another one current) and reads a restore straight into the live CUDA
tensors. The format is device-independent: a checkpoint of a CUDA model restores into a CPU model
and the reverse. JAX arrays on the GPU are saved from a host view taken at ``save()`` and restored
as new arrays with the given sharding.

PyTorch without CUDA, or JAX without a GPU, skips the tests of that framework only (and without
CuPy the whole tier is skipped, see ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import os
import warnings

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _cuda
from asyncckpt._runtime import Runtime
from asyncckpt.io.storage import FileStorage
from asyncckpt.testing.storage import GatedStorage

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch and CuPy

try:
    import torch
except ImportError:  # the JAX tests still run
    torch = None

ASYNC = ac.CheckpointOptions(enable_async=True)




@pytest.fixture
def cuda(cp):
    """``"cuda"``, once PyTorch has a CUDA device; the test is skipped otherwise."""
    if torch is None:
        pytest.skip("PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device (a CPU build?)")
    yield "cuda"
    torch.cuda.synchronize()


@pytest.fixture
def jax():
    """The ``jax`` module, once it has a GPU device; the test is skipped otherwise."""
    with warnings.catch_warnings():  # a plugin warning at import is not a test failure
        warnings.simplefilter("ignore")
        module = pytest.importorskip("jax")
        try:
            gpus = [device for device in module.devices() if device.platform == "gpu"]
        except Exception as exc:
            pytest.skip(f"JAX found no devices ({type(exc).__name__}: {exc})")
    if not gpus:
        pytest.skip("JAX has no GPU device (install jax[cuda12] for it)")
    return module


# --------------------------------------------------------------------------------------------- torch state
class Run:
    """A small model (one 8 MiB weight, small ones the save packs, batch-norm buffers) with AdamW."""

    def __init__(self, device: str, seed: int = 0, dtype=None) -> None:
        torch.manual_seed(seed)
        self.device = device
        self.model = torch.nn.Sequential(
            torch.nn.Linear(1024, 2048), torch.nn.BatchNorm1d(2048), torch.nn.ReLU(), torch.nn.Linear(2048, 16)
        ).to(device=device, dtype=dtype)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1)
        self.dtype = self.model[0].weight.dtype
        self.data = torch.Generator(device=device).manual_seed(1000 + seed)

    def checkpoint(self) -> ac.Checkpoint:
        return ac.Checkpoint(model=self.model, optimizer=self.optimizer)

    def backward(self) -> None:
        """Gradients of one batch (forward included: batch norm updates its running statistics)."""
        x = torch.randn(32, 1024, device=self.device, dtype=self.dtype, generator=self.data)
        self.optimizer.zero_grad()
        self.model(x).float().pow(2).mean().backward()

    def step(self) -> None:
        self.backward()
        self.optimizer.step()

    def state(self) -> dict[str, torch.Tensor]:
        """Clones of every tensor the checkpoint holds: parameters, buffers, AdamW's moments and steps."""
        state = {f"model/{name}": tensor.detach().clone() for name, tensor in self.model.state_dict().items()}
        for index, param in enumerate(self.model.parameters()):
            for key, value in self.optimizer.state[param].items():
                state[f"optimizer/{index}.{key}"] = value.detach().clone()
        return state


def assert_same_state(actual: dict, expected: dict, device: str | None = None) -> None:
    """Bit-exact: same names, dtypes, shapes and bytes (``device``: where the actual tensors must live)."""
    assert actual.keys() == expected.keys()
    for name, tensor in actual.items():
        want = expected[name]
        if device is not None and name.startswith("model/"):
            assert tensor.device.type == device, name
        assert tensor.dtype == want.dtype and tensor.shape == want.shape, name
        assert torch.equal(tensor.cpu(), want.cpu()), name


def same_grads(*runs: Run, seed: int) -> None:
    """Give every run the same gradients, so a step is elementwise (AdamW) and bit-exact to compare."""
    generator = torch.Generator().manual_seed(seed)
    for param_index, param in enumerate(runs[0].model.parameters()):
        grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        for run in runs:
            list(run.model.parameters())[param_index].grad = grad.to(run.device)


def trained(device: str, steps: int = 3, seed: int = 0, dtype=None) -> Run:
    run = Run(device, seed=seed, dtype=dtype)
    for _ in range(steps):
        run.step()
    return run


# --------------------------------------------------------------------------------------------- torch tests
def test_model_and_adamw_round_trip_bit_exact_and_resume(cuda, prefix):
    saved = trained(cuda)
    expected = saved.state()
    path = saved.checkpoint().save(prefix)

    resumed = Run(cuda, seed=7)  # other initial values, no AdamW state yet
    assert not resumed.optimizer.state
    resumed.checkpoint().restore(path).assert_consumed()
    assert_same_state(resumed.state(), expected, device=cuda)
    assert resumed.optimizer.state_dict()["param_groups"] == saved.optimizer.state_dict()["param_groups"]

    same_grads(saved, resumed, seed=1)  # the resumed optimizer goes on exactly as the saved one
    saved.optimizer.step()
    resumed.optimizer.step()
    assert_same_state(resumed.state(), saved.state())


@pytest.mark.parametrize("stream", ["default", "side"], ids=["default-stream", "side-stream"])
def test_an_optimizer_step_right_after_an_async_save_does_not_change_what_is_written(
    cuda, prefix, external_stream, stream
):
    """The write is held at the storage while training goes on: the device capture at save() is what lands."""
    run = trained(cuda)
    run.backward()  # gradients ready: the step right after save() changes parameters and moments
    training = torch.cuda.current_stream()
    if stream == "side":
        training = torch.cuda.Stream()
        training.wait_stream(torch.cuda.current_stream())  # the gradients were made on the default stream
    runtime = Runtime()
    try:
        gated = GatedStorage(FileStorage(), runtime)
        settings = ac.WriteSettings(storage=gated, runtime=runtime)
        options = ac.CheckpointOptions(enable_async=True, write_settings=settings)
        with torch.cuda.stream(training), external_stream(training):
            expected = run.state()  # clones taken before save(), on the training stream
            checkpoint = run.checkpoint()
            path = checkpoint.save(prefix, options=options)
            run.optimizer.step()  # at once, on the same stream
            for _ in range(2):
                run.step()
        assert gated.reached.wait(60), "the writer never reached storage"
        torch.cuda.current_stream().wait_stream(training)
        changed = run.state()
        assert not torch.equal(changed["model/0.weight"], expected["model/0.weight"])
        assert not torch.equal(changed["optimizer/0.exp_avg"], expected["optimizer/0.exp_avg"])
        gated.open_gate()
        checkpoint.sync()
    finally:
        runtime.close()
    restored = Run(cuda, seed=5)
    restored.checkpoint().restore(path).assert_consumed()
    assert_same_state(restored.state(), expected, device=cuda)


def test_restore_reads_straight_into_the_cuda_parameters(cuda, cp, prefix):
    saved = trained(cuda)
    expected = saved.state()
    path = saved.checkpoint().save(prefix)

    live = trained(cuda, steps=1, seed=3)  # moments exist: they are read into too
    parameters = list(live.model.parameters())
    pointers = {name: tensor.data_ptr() for name, tensor in live.model.state_dict().items()}
    stager = _cuda.stager_for(_cuda.cupy_backend(torch.cuda.current_device()))
    uploads = stager.stats["uploaded_chunks"] + stager.stats["direct_uploads"]
    live.checkpoint().restore(path).assert_consumed()
    torch.cuda.synchronize()
    assert {name: tensor.data_ptr() for name, tensor in live.model.state_dict().items()} == pointers
    assert all(a is b for a, b in zip(live.model.parameters(), parameters))
    assert stager.stats["uploaded_chunks"] + stager.stats["direct_uploads"] > uploads  # the device path ran
    assert_same_state(live.state(), expected, device=cuda)


@pytest.mark.parametrize("source, target", [("cuda", "cpu"), ("cpu", "cuda")], ids=["cuda-to-cpu", "cpu-to-cuda"])
def test_a_checkpoint_restores_on_the_other_device(cuda, prefix, source, target):
    saved = trained(source)
    expected = saved.state()
    path = saved.checkpoint().save(prefix)
    restored = trained(target, steps=1, seed=9)
    restored.checkpoint().restore(path).assert_consumed()
    assert_same_state(restored.state(), expected, device=target)
    fresh = Run(target, seed=11)  # and with no AdamW state yet: the moments are created on the target
    fresh.checkpoint().restore(path).assert_consumed()
    assert_same_state(fresh.state(), expected, device=target)
    assert all(value.device.type == target for value in fresh.optimizer.state[fresh.model[0].weight].values()
               if value.dim())


def test_asave_and_arestore_of_cuda_state(cuda, prefix):
    run = trained(cuda)
    run.backward()
    expected = run.state()

    async def save_then_step() -> str:
        saving = asyncio.ensure_future(run.checkpoint().asave(prefix))
        await asyncio.sleep(0)  # asave has taken its snapshot: it ran up to its first await
        run.optimizer.step()  # a step while the write is in flight
        return await saving

    path = asyncio.run(save_then_step())
    restored = Run(cuda, seed=4)

    async def restore() -> None:
        status = await restored.checkpoint().arestore(path)
        status.assert_consumed()

    asyncio.run(restore())
    assert_same_state(restored.state(), expected, device=cuda)
    assert not torch.equal(run.model[0].weight.detach(), expected["model/0.weight"])


def test_bf16_cuda_parameters_round_trip(cuda, prefix):
    """bfloat16 CUDA parameters: copied to the host at save() (no device capture for them yet), restored bit-exact."""
    saved = trained(cuda, dtype=torch.bfloat16)
    expected = saved.state()
    assert expected["model/0.weight"].dtype == torch.bfloat16
    path = saved.checkpoint().save(prefix)
    restored = trained(cuda, steps=1, seed=2, dtype=torch.bfloat16)
    restored.checkpoint().restore(path).assert_consumed()
    assert_same_state(restored.state(), expected, device=cuda)


# --------------------------------------------------------------------------------------------- JAX
def test_a_pytree_of_gpu_arrays_round_trips_with_its_sharding(jax, prefix):
    jnp = jax.numpy
    gpus = [device for device in jax.devices() if device.platform == "gpu"]
    mesh = jax.sharding.Mesh(np.array(gpus), ("x",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))  # split over every GPU
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def state(seed: int) -> dict:
        key = jax.random.key(seed)
        return {
            "params": {
                "kernel": jax.device_put(jax.random.normal(key, (256 * len(gpus), 512), jnp.float32), rows),
                "bias": jax.device_put(jnp.full((512,), seed, jnp.float16), replicated),
            },
            "step": jax.device_put(jnp.int32(seed), gpus[0]),
            "lr": 0.5 + seed,
        }

    saved = state(3)
    checkpoint = ac.Checkpoint(state=ac.PyTree(saved))
    path = checkpoint.save(prefix, options=ASYNC)
    checkpoint.sync()
    holder = ac.PyTree(state(0))
    given = holder.value
    ac.Checkpoint(state=holder).restore(path).assert_consumed()
    restored = holder.value
    assert restored is not given
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(saved)
    for name in ("kernel", "bias"):
        got, want = restored["params"][name], saved["params"][name]
        assert got.sharding == given["params"][name].sharding, name
        assert {device.platform for device in got.sharding.device_set} == {"gpu"}, name
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert restored["step"].sharding == given["step"].sharding and int(restored["step"]) == 3
    assert restored["lr"] == 3.5
    np.testing.assert_array_equal(np.asarray(given["params"]["bias"]), np.zeros(512, np.float16))  # untouched
