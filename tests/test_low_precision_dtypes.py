"""The ml_dtypes types (bfloat16, float8, int4...): stored by name, bit-exact, never cast on restore."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt as ac
from asyncckpt import _cuda, cli
from asyncckpt import io as ckio
from asyncckpt.dtypes import ml_dtype_names, storable_dtypes, stored_dtype

ML_DTYPE_NAMES = ml_dtype_names()
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.format import decode_dtype, encode_dtype, parse_manifest, seal_manifest
from asyncckpt.io import SaveEntry, WriteSettings

from _device import CopyGate, DeviceHolder, simulated_device  # noqa: E402
from _samples import DTYPES  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
KEY = "v/.ATTRIBUTES/VARIABLE_VALUE"
#: What every NumPy dtype has been recorded as since format_version 1; old checkpoints hold these.
NUMPY_STRINGS = {
    "bool": "|b1", "int8": "|i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "uint8": "|u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
    "float16": "<f2", "float32": "<f4", "float64": "<f8", "complex64": "<c8", "complex128": "<c16",
}


def random_bits(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Every bit pattern is fair game (NaN payloads, negative zero, subnormals): random bytes viewed as ``name``."""
    dtype = np.dtype(getattr(ml_dtypes, name))
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.random.default_rng(seed).integers(0, 256, count * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def manifest(path) -> dict:
    with open(f"{path}.index", "rb") as handle:
        return json.loads(handle.read())


def test_every_listed_type_the_installed_ml_dtypes_has_is_storable():
    listed = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
              "float8_e4m3", "float8_e3m4", "float8_e8m0fnu", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn",
              "int4", "uint4", "int2", "uint2"]
    assert list(ML_DTYPE_NAMES) == [name for name in listed if hasattr(ml_dtypes, name)]
    assert set(listed[:6] + ["int4", "uint4"]) <= set(ML_DTYPE_NAMES)  # all in ml_dtypes 0.3.1, the oldest allowed


# ---------------------------------------------------------------------------------------------
# The manifest's strings


def test_low_precision_dtypes_are_recorded_by_name_and_numpy_ones_as_before():
    for name in ML_DTYPE_NAMES:
        dtype = np.dtype(getattr(ml_dtypes, name))
        assert encode_dtype(dtype) == name and decode_dtype(name) == dtype
    for name, text in NUMPY_STRINGS.items():
        assert encode_dtype(np.dtype(name)) == text and decode_dtype(text) == np.dtype(name)
    assert set(NUMPY_STRINGS) == set(DTYPES)
    assert storable_dtypes() == {np.dtype(name) for name in (*NUMPY_STRINGS, *ML_DTYPE_NAMES)}


@pytest.mark.parametrize("text", ["<V2", "|V1", "V2", "bfloat17", "BFLOAT16", " bfloat16", "float8", "int3",
                                  "<f1", "float32", "object", "", None, 2])
def test_unknown_and_ambiguous_dtype_strings_are_refused(text):
    with pytest.raises(ValueError, match="unknown dtype"):
        decode_dtype(text)


def test_plain_void_is_not_taken_for_bfloat16():
    with pytest.raises(TypeError, match="cannot be stored"):
        encode_dtype(np.dtype("V2"))
    assert stored_dtype(BF16.newbyteorder(">")) == BF16  # a byte-swapped bfloat16 is stored little-endian


def _record(dtype: str, shape: list[int], nbytes: int) -> dict:
    return {"dtype": dtype, "shape": shape, "nbytes": nbytes, "crc32c": 0,
            "extents": [{"file": "pack-00000", "offset": 0, "length": nbytes, "crc32c": 0}] if nbytes else []}


def _manifest_with(record: dict) -> bytes:
    return seal_manifest({"format": "asyncckpt", "format_version": 1, "data_dir": "ckpt.data-0123456789abcdef",
                          "object_graph": {}, "tensors": {"w": record}})


def test_manifest_sizes_are_checked_with_the_itemsize_of_the_named_dtype():
    parsed = parse_manifest(_manifest_with(_record("bfloat16", [3], 6)), source="P.index")
    assert parsed.tensors["w"].spec.dtype == BF16
    with pytest.raises(CorruptCheckpointError, match=r"key 'w'.*nbytes 3 does not match shape \(3,\) of dtype bfloat16"):
        parse_manifest(_manifest_with(_record("bfloat16", [3], 3)), source="P.index")
    assert parse_manifest(_manifest_with(_record("int4", [5], 5)), source="P.index")  # one element per byte


def test_a_manifest_naming_an_unknown_dtype_is_corrupt_naming_the_key():
    with pytest.raises(CorruptCheckpointError, match=r"P.index \(key 'w'\).*unknown dtype 'bfloat17'"):
        parse_manifest(_manifest_with(_record("bfloat17", [3], 6)), source="P.index")


# ---------------------------------------------------------------------------------------------
# Save and restore


@pytest.mark.parametrize("name", ML_DTYPE_NAMES)
def test_every_low_precision_dtype_round_trips_bit_exact(prefix, save_options, name):
    values = {"vector": random_bits(name, (300,), 1), "cube": random_bits(name, (3, 4, 5), 2),
              "scalar": random_bits(name, (), 3), "empty": random_bits(name, (0, 2), 4)}
    variables = {key: ac.Variable(value) for key, value in values.items()}
    checkpoint = ac.Checkpoint(**variables)
    path = checkpoint.save(prefix, options=save_options)
    checkpoint.sync()
    for variable in variables.values():
        variable.assign(np.zeros(variable.shape, variable.dtype))
    checkpoint.restore(path).assert_consumed()
    for key, value in values.items():
        assert same_bits(variables[key].numpy(), value), key
    tensors = manifest(path)["tensors"]
    itemsize = np.dtype(getattr(ml_dtypes, name)).itemsize
    assert itemsize == (2 if name == "bfloat16" else 1)
    for key, value in values.items():
        record = tensors[f"{key}/.ATTRIBUTES/VARIABLE_VALUE"]
        assert record["dtype"] == name and record["nbytes"] == value.size * itemsize
    reader = ac.load_checkpoint(path)
    assert same_bits(reader.get_tensor("cube/.ATTRIBUTES/VARIABLE_VALUE"), values["cube"])
    assert reader.get_variable_to_dtype_map()["cube/.ATTRIBUTES/VARIABLE_VALUE"] == np.dtype(getattr(ml_dtypes, name))
    assert dict(ac.list_variables(path))["cube/.ATTRIBUTES/VARIABLE_VALUE"] == [3, 4, 5]


def test_special_bfloat16_values_survive_bit_for_bit(prefix):
    bits = np.array([0x7FC0, 0x7FC1, 0xFFFF, 0x7F81, 0x8000, 0x0000, 0x0001, 0x7F80, 0xFF80], np.uint16)
    variable = ac.Variable(bits.view(ml_dtypes.bfloat16))  # NaNs with payloads, -0, a subnormal, +-inf
    path = ac.Checkpoint(v=variable).save(prefix)
    restored = ac.Variable(np.zeros(bits.size, ml_dtypes.bfloat16))
    ac.Checkpoint(v=restored).restore(path)
    np.testing.assert_array_equal(restored.numpy().view(np.uint16), bits)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["bfloat16", "float8_e4m3fn", "float8_e5m2"]), data=st.data())
def test_random_bit_patterns_round_trip(tmp_path, name, data):
    dtype = np.dtype(getattr(ml_dtypes, name))
    raw = data.draw(st.binary(min_size=0, max_size=64).filter(lambda b: len(b) % dtype.itemsize == 0))
    value = np.frombuffer(raw, dtype=dtype).copy()
    path = ckio.start_write(tmp_path / "ckpt", [SaveEntry("w", value)], {"nodes": []}).result()
    assert same_bits(ckio.open_reader(path).read("w"), value)


def test_a_bfloat16_value_does_not_restore_into_a_float16_variable(prefix):
    path = ac.Checkpoint(v=ac.Variable(np.ones(3, ml_dtypes.bfloat16))).save(prefix)
    target = ac.Variable(np.zeros(3, np.float16))
    with pytest.raises(ValueError, match=rf"dtype bfloat16 from checkpoint key '{KEY}'.*dtype float16"):
        ac.Checkpoint(v=target).restore(path)
    np.testing.assert_array_equal(target.numpy(), np.zeros(3, np.float16))  # nothing was cast in


def test_restore_on_create_and_add_variable_keep_the_low_precision_dtype(prefix):
    saved = np.array([1.5, -2.0, 0.25], ml_dtypes.bfloat16)
    path = ac.Checkpoint(v=ac.Variable(saved), w=ac.Variable(np.ones(2, ml_dtypes.float8_e4m3fn))).save(prefix)
    load = ac.Checkpoint()
    load.restore(path)
    v = ac.add_variable(load, "v", shape=[3], dtype=ml_dtypes.bfloat16)
    assert v.dtype == BF16 and same_bits(v.numpy(), saved)
    load.w = ac.Variable(np.zeros(2, ml_dtypes.float8_e4m3fn))  # deferred, restored on attach
    np.testing.assert_array_equal(load.w.numpy().astype(np.float32), [1.0, 1.0])
    other = ac.Checkpoint()
    other.restore(path)
    with pytest.raises(ValueError, match="dtype bfloat16 does not match the requested dtype float16"):
        ac.add_variable(other, "v", shape=[3], dtype=np.float16)
    fresh = ac.add_variable(ac.AutoTrackable(), "z", shape=[2], dtype=ml_dtypes.bfloat16)
    assert fresh.dtype == BF16 and not fresh.numpy().astype(np.float32).any()


def test_assignment_rounds_within_a_kind_and_refuses_what_would_wrap():
    v = ac.Variable(np.zeros(3, ml_dtypes.bfloat16))
    wide = np.array([1.0, 1.00390625, 3.14159], np.float32)  # the second sits half-way: rounds to even
    v.assign(wide)
    assert same_bits(v.numpy(), wide.astype(ml_dtypes.bfloat16))
    v.assign([0.5, 1, 2])  # Python numbers, as for float16
    wide32 = ac.Variable(np.zeros(3, np.float32))
    wide32.assign(v)  # bfloat16 into float32 is exact
    np.testing.assert_array_equal(wide32.numpy(), [0.5, 1.0, 2.0])
    small = ac.Variable(np.zeros(2, ml_dtypes.int4))
    small.assign([-8, 7])
    np.testing.assert_array_equal(small.numpy().astype(np.int8), [-8, 7])
    with pytest.raises(ValueError, match=r"outside \[-8, 7\].*int4"):
        small.assign([8, 0])
    with pytest.raises(ValueError, match="cannot assign a value of dtype float64"):
        small.assign([0.5, 1.5])


def test_cli_ls_shows_the_dtype_names(prefix, capsys):
    path = ac.Checkpoint(b=ac.Variable(np.zeros((2, 3), ml_dtypes.bfloat16)),
                         q=ac.Variable(np.zeros(4, ml_dtypes.int4))).save(prefix)
    assert cli.main(["ls", path]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["b"].split() == ["bfloat16", "[2,", "3]"]
    assert lines["q"].split() == ["int4", "[4]"]


# ---------------------------------------------------------------------------------------------
# The simulated device: the copy engine moves bytes, whatever the dtype


@pytest.fixture
def device():
    yield from simulated_device(CopyGate())


def test_a_bfloat16_device_value_round_trips_through_the_simulated_device(tmp_path, device):
    _cuda.stagers().configure(device, chunk_bytes=64, pinned_bytes=8 * 64)
    values = {"big": random_bits("bfloat16", (150,), 5), "small": random_bits("bfloat16", (7,), 6),
              "fp8": random_bits("float8_e4m3fn", (90,), 7)}
    entries = [SaveEntry(key, DeviceHolder(device.array(value))) for key, value in values.items()]
    small_files = WriteSettings(chunk_bytes=128, pack_bytes=64, small_array_bytes=32, device_backend=device)
    path = ckio.start_write(tmp_path / "ckpt", entries, {"nodes": []}, settings=small_files).result()
    assert {key: record["dtype"] for key, record in manifest(path)["tensors"].items()} == {
        "big": "bfloat16", "small": "bfloat16", "fp8": "float8_e4m3fn"}
    out = {key: device.empty(value.shape, value.dtype) for key, value in values.items()}
    stager = _cuda.Stager(device, pinned_bytes=8 * 48, chunk_bytes=48)
    result = ckio.open_reader(path).read_many(list(values), out=out, stager=stager)
    for key, value in values.items():
        assert result[key] is out[key] and same_bits(device.peek(out[key]), value), key
    assert stager.stats["uploaded_chunks"] > 0
    with pytest.raises(ValueError, match=r"cannot read key 'big' \(bfloat16\[150\]\) into a <f2\[150\] device array"):
        ckio.open_reader(path).read_many(["big"], out={"big": device.empty((150,), np.float16)}, stager=stager)
