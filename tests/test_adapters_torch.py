"""PyTorch state straight into ``Checkpoint``: modules, optimizers, schedulers, scalers, generators, dicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import asyncckpt as ac  # noqa: E402
from asyncckpt import cli  # noqa: E402
from asyncckpt._runtime import Runtime  # noqa: E402
from asyncckpt.io.storage import FileStorage  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _fakes import GatedStorage  # noqa: E402


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


class Run:
    """A small AdamW + StepLR + GradScaler training run whose data comes from its own generator."""

    def __init__(self, seed: int = 0) -> None:
        self.model = make_model(seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        self.data = torch.Generator().manual_seed(1234 + seed)

    def checkpoint(self) -> ac.Checkpoint:
        return ac.Checkpoint(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                             scaler=self.scaler, data=ac.RandomState(self.data))

    def step(self) -> None:
        x = torch.randn(16, 4, generator=self.data)
        loss = self.model(x).pow(2).mean()
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()


def state_of(module: torch.nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_of_adamw_scheduler_and_scaler_run_is_bit_exact(tmp_path):
    reference = Run()
    for _ in range(7):
        reference.step()

    interrupted = Run()
    for _ in range(4):
        interrupted.step()
    path = interrupted.checkpoint().save(tmp_path / "ckpt")

    resumed = Run(seed=99)  # other initial values, no optimizer state yet
    assert not resumed.optimizer.state
    resumed.checkpoint().restore(path).assert_consumed()
    for _ in range(3):
        resumed.step()
    assert_same_state(state_of(resumed.model), state_of(reference.model))
    assert resumed.scheduler.state_dict() == reference.scheduler.state_dict()
    assert resumed.scaler.get_scale() == reference.scaler.get_scale()
    for param, expected in zip(resumed.model.parameters(), reference.model.parameters()):
        got, want = resumed.optimizer.state[param], reference.optimizer.state[expected]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)
    assert resumed.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]


def test_keys_are_the_frameworks_own_names(tmp_path):
    run = Run()
    run.step()
    path = run.checkpoint().save(tmp_path / "ckpt")
    names = {cli.readable_name(key) for key, _ in ac.list_variables(path)}
    assert {"model/0.weight", "model/1.running_mean", "model/3.bias", "optimizer/state.0.exp_avg",
            "optimizer/state.3.exp_avg_sq", "optimizer/state.0.step"} <= names
    assert {"model/STATE_DICT_JSON", "optimizer/STATE_DICT_JSON", "scheduler/STATE_DICT_JSON"} <= names


def test_a_numpy_only_reader_gets_every_tensor(tmp_path):
    run = Run()
    run.step()
    path = run.checkpoint().save(tmp_path / "ckpt")
    reader = ac.load_checkpoint(path)
    weight = reader.get_tensor("model/.ATTRIBUTES/0..weight")
    assert isinstance(weight, np.ndarray) and weight.dtype == np.float32
    np.testing.assert_array_equal(weight, run.model[0].weight.detach().numpy())
    moment = reader.get_tensor("optimizer/.ATTRIBUTES/state..0..exp_avg")
    np.testing.assert_array_equal(moment, run.optimizer.state[run.model[0].weight]["exp_avg"].numpy())
    structure = json.loads(reader.get_tensor("optimizer/.ATTRIBUTES/STATE_DICT_JSON"))
    assert "dict" in structure  # typed JSON, readable without torch


def test_restore_reads_into_the_existing_parameters_in_place(tmp_path):
    saved = make_model(0)
    path = ac.Checkpoint(model=saved).save(tmp_path / "ckpt")
    model = make_model(1)
    pointers = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    parameters = list(model.parameters())
    ac.Checkpoint(model=model).restore(path).assert_consumed()
    assert {name: tensor.data_ptr() for name, tensor in model.state_dict().items()} == pointers
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert_same_state(state_of(model), state_of(saved))


def _gated(runtime):
    gated = GatedStorage(FileStorage(), runtime)
    return gated, ac.CheckpointOptions(enable_async=True, write_settings=ac.WriteSettings(storage=gated, runtime=runtime))


def test_an_optimizer_step_right_after_save_does_not_change_what_is_written(tmp_path):
    runtime = Runtime()
    try:
        gated, options = _gated(runtime)
        run = Run()
        run.step()
        expected_model, expected_moment = state_of(run.model), run.optimizer.state[run.model[0].weight]["exp_avg"].clone()
        checkpoint = run.checkpoint()
        path = checkpoint.save(tmp_path / "ckpt", options=options)
        assert gated.reached.wait(30), "the writer never reached storage"
        for _ in range(3):  # training goes on while the write is held open: forward updates BN, step the rest
            run.step()
        assert not torch.equal(run.model[0].weight, expected_model["0.weight"])
        gated.open_gate()
        checkpoint.sync()
    finally:
        runtime.close()
    restored = Run(seed=5)
    restored.checkpoint().restore(path).assert_consumed()
    assert_same_state(state_of(restored.model), expected_model)
    assert torch.equal(restored.optimizer.state[restored.model[0].weight]["exp_avg"], expected_moment)


def test_a_state_dict_is_saved_whole_and_restored_into_its_tensors(tmp_path):
    model = make_model(0)
    expected = state_of(model)
    path = ac.Checkpoint(sd=model.state_dict()).save(tmp_path / "ckpt")
    other = make_model(1)
    state = other.state_dict()
    tensors = dict(state)
    checkpoint = ac.Checkpoint(sd=state)
    assert isinstance(checkpoint.sd, ac.PyTree)
    checkpoint.restore(path).assert_consumed()
    assert type(state) is type(model.state_dict()) and all(state[k] is tensors[k] for k in tensors)  # not rewrapped
    assert_same_state(state_of(other), expected)  # the tensors alias the module: it is restored


def test_any_stateful_object_is_found(tmp_path):
    class Counter:
        def __init__(self):
            self.seen, self.table = 0, np.zeros(3)

        def state_dict(self):
            return {"seen": self.seen, "table": self.table, "ratio": float("nan"), "pair": (1, -0.0), 5: None}

        def load_state_dict(self, state):
            self.seen, self.table, self.loaded = state["seen"], state["table"], state

    counter = Counter()
    counter.seen, counter.table[:] = 41, [1, 2, 3]
    path = ac.Checkpoint(counter=counter).save(tmp_path / "ckpt")
    fresh = Counter()
    ac.Checkpoint(counter=fresh).restore(path).assert_consumed()
    assert fresh.seen == 41 and fresh.table.tolist() == [1, 2, 3]
    assert np.isnan(fresh.loaded["ratio"]) and fresh.loaded["pair"] == (1, -0.0)
    assert str(fresh.loaded["pair"][1]) == "-0.0" and fresh.loaded[5] is None


def test_state_that_is_not_data_is_refused_naming_where_it_is(tmp_path):
    class Holder:
        def state_dict(self):
            return {"inner": {"callback": print}}

        def load_state_dict(self, state):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match=r"builtin_function_or_method.*inner\.callback.*never pickled"):
        ac.Checkpoint(holder=Holder()).save(tmp_path / "ckpt")


def test_a_checkpoint_value_of_another_dtype_is_refused_naming_it(tmp_path):
    path = ac.Checkpoint(sd={"w": torch.zeros(3, dtype=torch.float64)}).save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"'w'.*float64\[3\].*float32\[3\]"):
        ac.Checkpoint(sd={"w": torch.zeros(3)}).restore(path)


def test_a_module_with_other_parameters_fails_loudly(tmp_path):
    path = ac.Checkpoint(model=torch.nn.Linear(3, 2)).save(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="Missing key"):
        ac.Checkpoint(model=torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))).restore(path)


def test_strict_false_through_an_explicit_state_dict_adapter(tmp_path):
    source = torch.nn.Sequential(torch.nn.Linear(3, 2))
    path = ac.Checkpoint(model=source).save(tmp_path / "ckpt")
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    ac.Checkpoint(model=ac.StateDict(target, strict=False)).restore(path)
    assert torch.equal(target[0].weight, source[0].weight)


def _python_draws(generator):
    return [generator.random() for _ in range(4)]


@pytest.mark.parametrize(("make", "draw"), [
    (lambda: torch.Generator().manual_seed(3), lambda g: torch.rand(4, generator=g).tolist()),
    (lambda: torch, lambda g: torch.rand(4).tolist()),
    (lambda: np.random.default_rng(3), _python_draws),
    (lambda: np.random.RandomState(3), _python_draws),
    (lambda: __import__("random").Random(3), _python_draws),
], ids=["torch.Generator", "torch", "numpy.Generator", "numpy.RandomState", "random.Random"])
def test_random_state_makes_a_resumed_run_draw_the_same_numbers(tmp_path, make, draw):
    generator = make()
    draw(generator)
    path = ac.Checkpoint(rng=ac.RandomState(generator)).save(tmp_path / "ckpt")
    expected = draw(generator)
    draw(generator)  # move on
    ac.Checkpoint(rng=ac.RandomState(generator)).restore(path).assert_consumed()
    assert draw(generator) == expected


def test_random_state_refuses_another_generators_state(tmp_path):
    path = ac.Checkpoint(rng=ac.RandomState(np.random.default_rng(1))).save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="numpy.PCG64"):
        ac.Checkpoint(rng=ac.RandomState(torch.Generator())).restore(path)


def test_a_bare_tensor_is_one_value(tmp_path):
    tensor = torch.arange(6.0).reshape(2, 3)
    path = ac.Checkpoint(w=tensor).save(tmp_path / "ckpt")
    assert "w/.ATTRIBUTES/VARIABLE_VALUE" in dict(ac.list_variables(path))
    target = torch.zeros(2, 3)
    ac.Checkpoint(w=target).restore(path).assert_consumed()
    assert torch.equal(target, tensor)


def test_the_core_never_imports_a_framework_or_ml_dtypes():
    """Importing ml_dtypes alone takes about a second: a NumPy-only save and restore must not pay it."""
    code = (
        "import sys, tempfile, numpy as np, asyncckpt as ac\n"
        "ac.Checkpoint(v=ac.Variable(np.ones(3)), d={'a': np.zeros(2)}).save(tempfile.mkdtemp() + '/c')\n"
        "ac.Checkpoint().restore(None)\n"
        "print(sorted(m for m in ('torch', 'jax', 'ml_dtypes') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_module_attached_after_restore_gets_its_values_then(tmp_path):
    saved = make_model(0)
    path = ac.Checkpoint(model=saved).save(tmp_path / "ckpt")
    checkpoint = ac.Checkpoint()
    status = checkpoint.restore(path)
    model = make_model(1)
    checkpoint.model = model  # deferred restore: applied when the dependency appears
    status.assert_consumed()
    assert_same_state(state_of(model), state_of(saved))
    assert checkpoint.model is model  # the attribute keeps the module itself


def test_asave_and_arestore_with_torch_state(tmp_path):
    import asyncio

    run = Run()
    run.step()
    expected = state_of(run.model)

    async def main():
        path = await run.checkpoint().asave(tmp_path / "ckpt")
        run.step()  # changes the live state after the awaited save
        fresh = Run(seed=3)
        await fresh.checkpoint().arestore(path)
        return fresh

    fresh = asyncio.run(main())
    assert_same_state(state_of(fresh.model), expected)


def test_a_manager_resumes_torch_state(tmp_path):
    run = Run()
    manager = ac.CheckpointManager(run.checkpoint(), tmp_path, max_to_keep=2)
    for _ in range(3):
        run.step()
        manager.save()
    manager.sync()
    expected = state_of(run.model)
    resumed = Run(seed=8)
    resumed_manager = ac.CheckpointManager(resumed.checkpoint(), tmp_path, max_to_keep=2)
    assert resumed_manager.restore_or_initialize() == resumed_manager.latest_checkpoint
    assert_same_state(state_of(resumed.model), expected)


def test_variables_take_and_assign_cpu_tensors():
    variable = ac.Variable(torch.arange(3.0))
    assert variable.dtype == np.float32
    variable.assign(torch.tensor([5.0, 6.0, 7.0]))
    np.testing.assert_array_equal(variable.numpy(), [5, 6, 7])
    with pytest.raises(TypeError, match="pass the tensor .* to Checkpoint directly"):
        ac.Variable.wrap(torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_low_precision_tensors_round_trip_bit_exact_and_read_as_ml_dtypes(tmp_path, dtype):
    import ml_dtypes

    bits = torch.randint(0, 256, (64,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tensor = bits.view(dtype) if dtype.itemsize == 1 else torch.randn(32).to(dtype)
    path = ac.Checkpoint(sd={"w": tensor}).save(tmp_path / "ckpt")
    value = ac.load_checkpoint(path).get_tensor("sd/.ATTRIBUTES/w")
    assert value.dtype == np.dtype(getattr(ml_dtypes, str(dtype).removeprefix("torch.")))
    target = torch.zeros_like(tensor)
    ac.Checkpoint(sd={"w": target}).restore(path).assert_consumed()
    carrier = torch.uint8 if dtype.itemsize == 1 else torch.int16
    assert torch.equal(target.view(carrier), tensor.view(carrier))  # bit-exact, NaN payloads included
    saved, fresh = ac.Checkpoint(sd=Holder({"w": tensor})).save(tmp_path / "held"), Holder({})
    ac.Checkpoint(sd=fresh).restore(saved).assert_consumed()
    assert fresh.state["w"].dtype == dtype  # no live tensor to follow: rebuilt as a tensor of the saved dtype
    assert torch.equal(fresh.state["w"].view(carrier), tensor.view(carrier))


class Holder:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def test_a_bfloat16_module_round_trips(tmp_path):
    model = make_model(0).to(torch.bfloat16)
    path = ac.Checkpoint(model=model).save(tmp_path / "ckpt")
    other = make_model(1).to(torch.bfloat16)
    ac.Checkpoint(model=other).restore(path).assert_consumed()
    assert_same_state(state_of(other), state_of(model))


def test_framework_state_inside_tracked_containers_is_saved_and_left_in_place(tmp_path):
    module = torch.nn.Linear(2, 1)
    tensor = torch.arange(3.0)
    items = [ac.Variable(1.0), tensor]
    holder = ac.AutoTrackable()
    holder.extra = {"v": ac.Variable(2.0), "t": torch.ones(2), "mod": module, "sd": {"w": torch.zeros(2)}}
    holder.items = items
    assert items[1] is tensor and holder.items[1] is tensor  # the user's list keeps the user's tensor
    assert holder.extra["mod"] is module and type(holder.extra["sd"]) is dict
    path = ac.Checkpoint(holder=holder).save(tmp_path / "ckpt")
    names = {cli.readable_name(key) for key, _ in ac.list_variables(path)}
    assert {"holder/extra/v", "holder/extra/t", "holder/extra/mod/weight", "holder/extra/sd/w", "holder/items/1"} <= names
    target = ac.AutoTrackable()
    target_tensor, target_module = torch.zeros(3), torch.nn.Linear(2, 1)
    target.extra = {"v": ac.Variable(0.0), "t": torch.zeros(2), "mod": target_module, "sd": {"w": torch.ones(2)}}
    target.items = [ac.Variable(0.0), target_tensor]
    ac.Checkpoint(holder=target).restore(path).assert_consumed()
    assert torch.equal(target_tensor, tensor) and torch.equal(target_module.weight, module.weight)
    assert torch.equal(target.extra["sd"]["w"], torch.zeros(2))


def test_unsupported_tensors_are_refused_naming_the_key(tmp_path):
    with pytest.raises(TypeError, match=r"'w'.*sparse"):
        ac.Checkpoint(sd={"w": torch.eye(3).to_sparse()}).save(tmp_path / "a")
    conj = torch.tensor([1 + 2j, 3 - 1j]).conj()  # a lazily conjugated view: saved as its values
    path = ac.Checkpoint(sd={"c": conj}).save(tmp_path / "b")
    np.testing.assert_array_equal(ac.load_checkpoint(path).get_tensor("sd/.ATTRIBUTES/c"), [1 - 2j, 3 + 1j])
