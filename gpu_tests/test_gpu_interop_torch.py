"""PyTorch CUDA tensors as save sources and restore targets, adopted through DLPack / the CUDA array interface."""

from __future__ import annotations

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _arrays, _cuda

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("PyTorch has no CUDA device", allow_module_level=True)


def test_torch_tensors_are_device_arrays_adopted_without_a_copy(cp):
    tensor = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
    assert _arrays.is_device_array(tensor)
    assert not _arrays.is_device_array(tensor.cpu())
    view = _arrays.adopt_device_array(tensor)
    assert isinstance(view, cp.ndarray)
    assert view.data.ptr == tensor.data_ptr()
    view[0, 0] = 100  # writes through to the tensor
    torch.cuda.synchronize()
    assert tensor[0, 0].item() == 100


def test_torch_tensor_as_a_save_source(cp):
    tensor = torch.randn(1000, device="cuda", dtype=torch.float64)
    expected = tensor.cpu().numpy()
    (capture,) = _cuda.snapshot_device_arrays([tensor], labels=["t"])
    tensor.mul_(2)  # later work on torch's stream (the legacy default stream, as CuPy's by default)
    out = np.empty(capture.shape, dtype=capture.dtype)
    capture.read_into(0, out.reshape(-1).view(np.uint8))
    np.testing.assert_array_equal(out, expected)


def test_torch_tensor_as_a_restore_target(cp):
    tensor = torch.zeros((4, 5), dtype=torch.int32, device="cuda")
    _arrays.copy_into(tensor, np.arange(20, dtype=np.int32).reshape(4, 5))
    assert torch.equal(tensor.cpu(), torch.arange(20, dtype=torch.int32).reshape(4, 5))


def test_variable_from_a_torch_tensor_round_trips(cp, prefix):
    tensor = torch.randn(64, device="cuda")
    variable = ac.Variable(tensor)  # a CuPy copy on the tensor's device
    assert variable.device == f"cuda:{tensor.device.index}"
    path = ac.Checkpoint(v=variable).save(prefix)
    restored = ac.Variable(np.zeros(64, np.float32))
    ac.Checkpoint(v=restored).restore(path).assert_consumed()
    np.testing.assert_array_equal(restored.numpy(), tensor.cpu().numpy())


def test_torch_training_stream_made_current_for_the_save(cp, external_stream):
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tensor = torch.full((1 << 20,), 3.0, device="cuda")
        with external_stream(stream):
            (capture,) = _cuda.snapshot_device_arrays([tensor])
        tensor.fill_(4.0)
    out = np.empty(capture.shape, dtype=capture.dtype)
    capture.read_into(0, out.reshape(-1).view(np.uint8))
    assert (out == 3.0).all()


def test_wrapped_torch_tensor_shares_memory_for_save_and_restore(cp, prefix):
    tensor = torch.arange(1 << 16, dtype=torch.float32, device="cuda")
    variable = ac.Variable.wrap(tensor, name="w")
    assert variable.array.data.ptr == tensor.data_ptr()  # no copy
    checkpoint = ac.Checkpoint(w=variable)
    path = checkpoint.save(prefix, options=ac.CheckpointOptions(enable_async=True))
    tensor.mul_(-1)  # a torch in-place step right after save(): not in the checkpoint
    checkpoint.sync()
    np.testing.assert_array_equal(variable.numpy(), -np.arange(1 << 16, dtype=np.float32))
    checkpoint.restore(path).assert_consumed()  # writes into the tensor's memory
    torch.cuda.synchronize()
    assert torch.equal(tensor, torch.arange(1 << 16, dtype=torch.float32, device="cuda"))


def test_wrapped_torch_parameter_is_shared_too(cp, prefix):
    parameter = torch.nn.Parameter(torch.ones(256, device="cuda"))
    variable = ac.Variable.wrap(parameter)
    assert variable.array.data.ptr == parameter.data_ptr()
    path = ac.Checkpoint(p=variable).save(prefix)
    with torch.no_grad():
        parameter.mul_(3)  # an optimizer step
    ac.Checkpoint(p=variable).restore(path)
    torch.cuda.synchronize()
    assert torch.equal(parameter.detach(), torch.ones(256, device="cuda"))
