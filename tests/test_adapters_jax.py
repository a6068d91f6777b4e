"""JAX state in ``Checkpoint``: pytrees with their structure, dtypes, sharding and typed PRNG keys."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import asyncckpt as ac  # noqa: E402
from asyncckpt import cli  # noqa: E402


class AdamState(NamedTuple):
    count: jax.Array
    mu: dict


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:  # a registered node, as flax.struct dataclasses are
    step: int
    params: dict
    opt: AdamState
    key: jax.Array


def sharded(array):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    return jax.device_put(array, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))


def make_state(seed: int) -> TrainState:
    key = jax.random.key(seed)
    kernel = jax.random.normal(key, (8, 4), jnp.float32) + seed
    params = {"dense": {"kernel": sharded(kernel), "bias": jnp.full((4,), seed, jnp.float16)}}
    opt = AdamState(jnp.int32(seed), {"dense": {"kernel": jnp.zeros((8, 4)) + seed}})
    return TrainState(step=seed, params=params, opt=opt, key=jax.random.key(seed + 100))


def test_needs_several_devices():
    assert len(jax.devices()) >= 2, "conftest asks XLA for several CPU devices"


def test_a_train_state_round_trips_with_structure_dtypes_sharding_and_keys(tmp_path):
    saved = make_state(3)
    path = ac.Checkpoint(state=ac.PyTree(saved)).save(tmp_path / "ckpt")
    holder = ac.PyTree(make_state(0))
    given = holder.value
    ac.Checkpoint(state=holder).restore(path).assert_consumed()
    restored = holder.value
    assert restored is not given and isinstance(restored, TrainState) and isinstance(restored.opt, AdamState)
    assert given.step == 0 and float(given.opt.count) == 0  # the given tree is untouched
    assert restored.step == 3
    kernel = restored.params["dense"]["kernel"]
    assert kernel.sharding == given.params["dense"]["kernel"].sharding and len(kernel.sharding.device_set) >= 2
    np.testing.assert_array_equal(kernel, saved.params["dense"]["kernel"])
    assert restored.params["dense"]["bias"].dtype == jnp.float16
    assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(saved.key))
    np.testing.assert_array_equal(jax.random.normal(restored.key, (3,)), jax.random.normal(saved.key, (3,)))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(saved)


def test_keys_are_the_tree_paths(tmp_path):
    path = ac.Checkpoint(state=ac.PyTree(make_state(1))).save(tmp_path / "ckpt")
    names = {cli.readable_name(key) for key, _ in ac.list_variables(path)}
    assert {"state/params.dense.kernel", "state/opt.mu.dense.kernel", "state/opt.count", "state/key"} <= names


def test_a_parameter_dict_passed_directly_is_saved_and_left_alone(tmp_path):
    params = {"w": jnp.arange(4.0), "b": {"c": jnp.ones(2)}}
    checkpoint = ac.Checkpoint(params=params)
    assert type(params) is dict and type(params["b"]) is dict  # not rewrapped in place
    jax.jit(lambda p: p["w"] * 2)(params)  # still a plain pytree for jit
    path = checkpoint.save(tmp_path / "ckpt")
    holder = ac.Checkpoint(params={"w": jnp.zeros(4), "b": {"c": jnp.zeros(2)}}).params
    assert isinstance(holder, ac.PyTree)
    ac.Checkpoint(params=holder).restore(path).assert_consumed()
    np.testing.assert_array_equal(holder.value["w"], np.arange(4.0))


def test_a_tree_of_another_shape_is_refused_naming_the_leaves(tmp_path):
    path = ac.Checkpoint(t=ac.PyTree({"a": jnp.ones(2), "b": jnp.ones(3)})).save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"missing from the checkpoint \['c'\].*does not have \['b'\]"):
        ac.Checkpoint(t=ac.PyTree({"a": jnp.ones(2), "c": jnp.ones(3)})).restore(path)
    with pytest.raises(ValueError, match=r"'a'.*float32\[2\].*float32\[5\]"):
        ac.Checkpoint(t=ac.PyTree({"a": jnp.ones(5), "b": jnp.ones(3)})).restore(path)


def test_a_saved_jax_array_is_read_by_numpy(tmp_path):
    path = ac.Checkpoint(t=ac.PyTree({"a": sharded(jnp.arange(8.0))})).save(tmp_path / "ckpt")
    value = ac.load_checkpoint(path).get_tensor("t/.ATTRIBUTES/a")
    assert isinstance(value, np.ndarray)
    np.testing.assert_array_equal(value, np.arange(8.0))


class Loader:
    """A stateful object whose live state has no arrays yet: the restored ones are of the saved kind."""

    def __init__(self, state=None):
        self.state = state or {}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def test_state_with_no_live_leaf_to_follow_comes_back_as_jax_arrays(tmp_path):
    path = ac.Checkpoint(s=Loader({"x": jnp.arange(2), "n": np.arange(3)})).save(tmp_path / "ckpt")
    loader = Loader()
    ac.Checkpoint(s=loader).restore(path).assert_consumed()
    assert isinstance(loader.state["x"], jax.Array) and type(loader.state["n"]) is np.ndarray
    np.testing.assert_array_equal(loader.state["x"], [0, 1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int4"])
def test_low_precision_leaves_round_trip_bit_exact(tmp_path, dtype):
    values = jnp.asarray(np.linspace(-3, 3, 16), dtype=getattr(jnp, dtype))
    path = ac.Checkpoint(t=ac.PyTree({"w": sharded(values)})).save(tmp_path / "ckpt")
    holder = ac.PyTree({"w": sharded(jnp.zeros(16, getattr(jnp, dtype)))})
    ac.Checkpoint(t=holder).restore(path).assert_consumed()
    restored = holder.value["w"]
    assert restored.dtype == values.dtype
    carrier = np.uint8 if values.dtype.itemsize == 1 else np.uint16
    np.testing.assert_array_equal(np.asarray(restored).view(carrier), np.asarray(values).view(carrier))


def test_an_abstract_tree_from_eval_shape_is_restored_with_its_dtypes_and_sharding(tmp_path):
    saved = make_state(2)
    path = ac.Checkpoint(state=ac.PyTree(saved)).save(tmp_path / "ckpt")
    abstract = jax.eval_shape(lambda: make_state(0))
    sharding = saved.params["dense"]["kernel"].sharding
    abstract.params["dense"]["kernel"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding)
    holder = ac.PyTree(abstract)
    ac.Checkpoint(state=holder).restore(path).assert_consumed()
    restored = holder.value
    kernel = restored.params["dense"]["kernel"]
    assert isinstance(kernel, jax.Array) and kernel.sharding == sharding
    np.testing.assert_array_equal(kernel, saved.params["dense"]["kernel"])
    assert restored.params["dense"]["bias"].dtype == jnp.float16
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(saved.key))
    wrong = jax.eval_shape(lambda: make_state(0))
    wrong.params["dense"]["bias"] = jax.ShapeDtypeStruct((4,), jnp.float32)
    with pytest.raises(ValueError, match=r"float16\[4\].*float32\[4\]"):
        ac.Checkpoint(state=ac.PyTree(wrong)).restore(path)


def test_an_abstract_tree_cannot_be_saved(tmp_path):
    with pytest.raises(TypeError, match="ShapeDtypeStruct.*no values"):
        ac.Checkpoint(t=ac.PyTree({"a": jax.ShapeDtypeStruct((2,), jnp.float32)})).save(tmp_path / "ckpt")


def test_arrays_inside_a_tracked_container_come_back_into_the_users_container(tmp_path):
    path = ac.Checkpoint(state={"params": {"w": jnp.ones(3)}, "step": ac.Variable(np.int64(7))},
                         stack=[jnp.full(2, 5.0), ac.Variable(np.int64(1))]).save(tmp_path / "ckpt")
    live = {"params": {"w": jnp.zeros(3)}, "step": ac.Variable(np.int64(0))}
    stack = [jnp.zeros(2), ac.Variable(np.int64(0))]
    checkpoint = ac.Checkpoint(state=live, stack=stack)
    checkpoint.restore(path).assert_consumed()
    assert live["params"]["w"].tolist() == [1.0, 1.0, 1.0]  # the user's own dict holds the restored arrays
    assert checkpoint.state["params"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert stack[0].tolist() == [5.0, 5.0] and int(live["step"].numpy()) == 7
    checkpoint.save(tmp_path / "again")  # the wrappers take the restored values as their own, not as outside changes


def _placed(array, mesh_shape, spec):
    devices = np.array(jax.devices()[: int(np.prod(mesh_shape))]).reshape(mesh_shape)
    mesh = jax.sharding.Mesh(devices, ("a", "b")[: len(mesh_shape)])
    return jax.device_put(array, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


def _stored(path) -> dict:
    import json

    with open(str(path) + ".index", "rb") as index:
        return json.loads(index.read())["tensors"]


def test_an_array_split_over_devices_is_saved_shard_by_shard_each_box_once(tmp_path):
    value = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    tree = {"split": _placed(value, (4,), ("a",)), "half": _placed(value, (2, 2), ("a", None))}
    path = ac.Checkpoint(state=ac.PyTree(tree)).save(tmp_path / "ckpt")
    stored = _stored(path)
    split, half = stored["state/.ATTRIBUTES/split"], stored["state/.ATTRIBUTES/half"]
    assert [shard["offset"] for shard in split["shards"]] == [[0, 0], [2, 0], [4, 0], [6, 0]]
    assert [shard["offset"] for shard in half["shards"]] == [[0, 0], [4, 0]]  # replicated on 2 devices each: once
    np.testing.assert_array_equal(ac.load_variable(path, "state/.ATTRIBUTES/half"), np.asarray(value))


@pytest.mark.parametrize("mesh_shape, spec", [
    ((4,), ("a",)),  # the same slicing
    ((4,), (None, "a")),  # rows -> columns
    ((2, 2), ("b", "a")),  # a 2 x 2 grid, transposed
    ((2,), ("a",)),  # fewer devices
    ((4,), (None, None)),  # replicated everywhere
])
def test_a_split_array_restores_into_any_other_sharding(tmp_path, mesh_shape, spec):
    value = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4) - 7.5
    path = ac.Checkpoint(state=ac.PyTree({"w": _placed(value, (4,), ("a",))})).save(tmp_path / "ckpt")
    like = _placed(jnp.zeros((8, 4), jnp.float32), mesh_shape, spec)
    holder = ac.PyTree({"w": like})
    ac.Checkpoint(state=holder).restore(path).assert_consumed()
    restored = holder.value["w"]
    assert restored.sharding == like.sharding
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(value))


def test_a_whole_array_restores_into_a_split_one_and_an_abstract_target(tmp_path):
    value = jnp.arange(16, dtype=jnp.int32).reshape(4, 4)
    path = ac.Checkpoint(state=ac.PyTree({"w": value})).save(tmp_path / "ckpt")
    like = _placed(jnp.zeros((4, 4), jnp.int32), (2, 2), ("a", "b"))
    abstract = jax.ShapeDtypeStruct((4, 4), jnp.int32, sharding=like.sharding)
    for target in (like, abstract):
        holder = ac.PyTree({"w": target})
        ac.Checkpoint(state=holder).restore(path).assert_consumed()
        assert holder.value["w"].sharding == like.sharding
        np.testing.assert_array_equal(np.asarray(holder.value["w"]), np.asarray(value))
