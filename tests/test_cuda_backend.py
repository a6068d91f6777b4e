"""The backend seam (asyncckpt._cuda.backend): the protocol the backends satisfy, the policy names."""

from __future__ import annotations

from asyncckpt._cuda import DEVICE_COPY, HOST_COPY, STREAM_WAIT, CapturePolicy, DeviceBackend
from asyncckpt.testing.fake_device import FakeDeviceBackend


def test_backends_satisfy_the_protocol():
    device = FakeDeviceBackend()
    try:
        assert isinstance(device, DeviceBackend)
        assert not isinstance(object(), DeviceBackend)
    finally:
        device.close()


def test_the_capture_policies_are_one_enum_whose_members_read_as_their_names():
    assert list(CapturePolicy) == [DEVICE_COPY, STREAM_WAIT, HOST_COPY]
    for policy, name in zip(CapturePolicy, ("device_copy", "stream_wait", "host_copy")):
        assert policy == name and str(policy) == f"{policy}" == name
        assert CapturePolicy(name) is policy
