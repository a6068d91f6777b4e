"""PyTorch state under the snapshot guarantee and atomic restores: the ways training changes tensors.

Each save here is held open at the storage (``GatedStorage``) while training goes on, so the
checkpoint shows whether what was written is the state of ``save()`` time.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import asyncckpt as ac  # noqa: E402
from asyncckpt._runtime import Runtime  # noqa: E402
from asyncckpt.io.storage import FileStorage  # noqa: E402
from asyncckpt.model.adapters import torch as torch_adapter  # noqa: E402
from asyncckpt.model.adapters import torch_objects  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _fakes import GatedStorage  # noqa: E402


class Net(torch.nn.Module):
    """A module declared outside torch (as every user's model is)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.bn = torch.nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(self.fc(x))


def _train(model, optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _state(module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _held_save(checkpoint, path, while_held):
    """Save with the write held open at storage, run ``while_held()``, then let the write finish."""
    runtime = Runtime()
    try:
        gated = GatedStorage(FileStorage(), runtime)
        options = ac.CheckpointOptions(enable_async=True, write_settings=ac.WriteSettings(storage=gated, runtime=runtime))
        saved = checkpoint.save(path, options=options)
        assert gated.reached.wait(30), "the writer never reached storage"
        while_held()
        gated.open_gate()
        checkpoint.sync()
    finally:
        runtime.close()
    return saved


@pytest.mark.parametrize("form", ["module", "state_dict", "data_list"])
def test_training_right_after_save_does_not_change_what_is_written(tmp_path, form):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = _state(model)
    value = {"module": model, "state_dict": model.state_dict(), "data_list": [p.data for p in model.parameters()]}[form]
    path = _held_save(ac.Checkpoint(state=value), tmp_path / "ckpt", lambda: _train(model, optimizer))
    assert not torch.equal(model.fc.weight, expected["fc.weight"])
    fresh = Net()
    if form == "data_list":
        holder = ac.Checkpoint(state=[p.data for p in fresh.parameters()])
    else:
        holder = ac.Checkpoint(state=fresh if form == "module" else fresh.state_dict())
    holder.restore(path).assert_consumed()
    restored = _state(fresh)
    names = ["fc.weight", "fc.bias", "bn.weight", "bn.bias"] if form == "data_list" else list(expected)
    for name in names:
        assert torch.equal(restored[name], expected[name]), name


def test_a_learning_rate_tensor_changed_by_its_scheduler_is_saved_as_it_was(tmp_path):
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def train():
        for _ in range(3):
            model(torch.randn(2, 16)).sum().backward()
            optimizer.step()
            scheduler.step()

    train()
    at_save = float(optimizer.param_groups[0]["lr"])
    path = _held_save(ac.Checkpoint(optimizer=optimizer, scheduler=scheduler), tmp_path / "ckpt", train)
    assert float(optimizer.param_groups[0]["lr"]) != at_save
    fresh = torch.optim.Adam(torch.nn.Linear(16, 16).parameters(), lr=torch.tensor(0.01))
    ac.Checkpoint(optimizer=fresh).restore(path).expect_partial()
    assert float(fresh.param_groups[0]["lr"]) == at_save


def test_a_second_checkpoint_of_the_same_model_leaves_a_write_in_flight_alone(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    expected = model[0].weight.detach().clone()
    first, second = ac.Checkpoint(model=model), ac.Checkpoint(model=model)

    def replace_and_save_again():
        model[0].weight.data = torch.full((16, 16), 9.0)  # new memory, no hook: the old bytes stay as they were
        second.save(tmp_path / "second")

    path = _held_save(first, tmp_path / "first", replace_and_save_again)
    reader = ac.load_checkpoint(path)
    assert np.array_equal(reader.get_tensor("model/.ATTRIBUTES/0..weight"), expected.numpy())
    later = ac.load_checkpoint(second.save(tmp_path / "third"))
    assert np.all(later.get_tensor("model/.ATTRIBUTES/0..weight") == 9.0)


def test_a_save_waits_for_an_optimizer_step_running_on_another_thread(tmp_path):
    class Slow(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
            self.entered = threading.Event()

        @torch.no_grad()
        def step(self):
            self.entered.set()
            time.sleep(0.3)
            for group in self.param_groups:
                for param in group["params"]:
                    param.fill_(9.0)

    model = torch.nn.Linear(16, 16)
    optimizer = Slow(model.parameters())
    with torch.no_grad():
        model.weight.fill_(1.0)
    thread = threading.Thread(target=optimizer.step)
    thread.start()
    assert optimizer.entered.wait(10)
    path = ac.Checkpoint(model=model).save(tmp_path / "ckpt")  # taken once the step is over
    thread.join()
    assert np.all(ac.load_checkpoint(path).get_tensor("model/.ATTRIBUTES/weight") == 9.0)


def test_a_strict_restore_with_other_keys_changes_nothing(tmp_path):
    torch.manual_seed(0)
    path = ac.Checkpoint(model=torch.nn.Sequential(torch.nn.Linear(16, 16))).save(tmp_path / "ckpt")
    bigger = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
    before = _state(bigger)
    with pytest.raises(RuntimeError, match=r'nothing was restored[\s\S]*Missing key\(s\) in state_dict: "1.weight", "1.bias"'):
        ac.Checkpoint(model=bigger).restore(path).expect_partial()
    for name, tensor in _state(bigger).items():
        assert torch.equal(tensor, before[name]), name


def test_a_non_strict_module_reports_the_checkpoint_values_it_did_not_take(tmp_path):
    torch.manual_seed(0)
    path = ac.Checkpoint(model=torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))).save(tmp_path / "c")
    smaller = torch.nn.Sequential(torch.nn.Linear(16, 16))
    adapter = ac.StateDict(smaller, strict=False)
    assert isinstance(adapter, torch_objects.ModuleState)  # parameters themselves, guarded like the automatic one
    status = ac.Checkpoint(model=adapter).restore(path)
    assert torch.equal(smaller[0].weight, torch.from_numpy(ac.load_checkpoint(path).get_tensor("model/.ATTRIBUTES/0..weight")))
    with pytest.raises(AssertionError, match=r"1\.weight"):
        status.assert_consumed()


def test_an_optimizer_restore_that_fails_leaves_its_moments_alone(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    path = ac.Checkpoint(opt=optimizer).save(tmp_path / "ckpt")
    more = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2), torch.nn.Linear(2, 2))
    other = torch.optim.AdamW(more.parameters())
    more(torch.randn(2, 16)).sum().backward()
    other.step()
    before = other.state[more[0].weight]["exp_avg"].clone()
    with pytest.raises(ValueError, match="parameter group"):
        ac.Checkpoint(opt=other).restore(path).expect_partial()
    assert torch.equal(other.state[more[0].weight]["exp_avg"], before)


def test_a_fresh_optimizer_over_other_shapes_is_refused_naming_the_parameter(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    path = ac.Checkpoint(opt=optimizer).save(tmp_path / "ckpt")
    wider = torch.nn.Sequential(torch.nn.Linear(16, 32))
    with pytest.raises(ValueError, match=r"shape \[16, 16\] at group 0, position 0.*\[32, 16\]"):
        ac.Checkpoint(opt=torch.optim.AdamW(wider.parameters())).restore(path).expect_partial()


def test_a_dict_of_a_module_and_a_tensor_tracks_each(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    path = ac.Checkpoint(state={"net": model, "step": torch.tensor(7)}).save(tmp_path / "ckpt")
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 16))
    live = {"net": fresh, "step": torch.tensor(0)}
    ac.Checkpoint(state=live).restore(path).assert_consumed()
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert int(live["step"]) == 7


def test_a_non_contiguous_tensor_is_restored_into_the_users_own_tensor(tmp_path):
    path = ac.Checkpoint(d={"t": torch.arange(6.0).reshape(2, 3).t()}, v=ac.Variable(np.int64(1))).save(tmp_path / "c")
    live = torch.zeros(2, 3).t()
    checkpoint = ac.Checkpoint(d={"t": live}, v=ac.Variable(np.int64(0)))
    checkpoint.restore(path).assert_consumed()
    assert live.tolist() == torch.arange(6.0).reshape(2, 3).t().tolist()
    bare = torch.zeros(2, 3).t()
    ac.Checkpoint(d=bare).restore(ac.Checkpoint(d=torch.ones(2, 3).t()).save(tmp_path / "b")).expect_partial()
    assert bare.tolist() == torch.ones(3, 2).tolist()


def test_a_forward_hook_left_by_another_process_state_goes_at_the_next_idle_forward():
    from torch.nn.modules import module as modules

    handle = modules.register_module_forward_pre_hook(torch_adapter._on_forward)  # as a forked child inherits it
    try:
        torch.nn.Linear(2, 2)(torch.randn(1, 2))
        assert torch_adapter._on_forward not in modules._global_forward_pre_hooks.values()
    finally:
        handle.remove()


def test_a_tree_leaf_of_another_kind_is_refused_and_changes_nothing(tmp_path):
    path = ac.Checkpoint(t={"w": torch.ones(32), "i": 7}).save(tmp_path / "ckpt")
    live = torch.zeros(32)
    with pytest.raises(ValueError, match="'i'.*holds a value of type int there but the live tree holds a Tensor"):
        ac.Checkpoint(t={"w": live, "i": torch.tensor(0)}).restore(path).expect_partial()
    assert torch.equal(live, torch.zeros(32))


def test_named_tuple_leaves_are_named_by_field(tmp_path):
    from typing import NamedTuple

    class Moments(NamedTuple):
        mu: object
        nu: object

    path = ac.Checkpoint(t={"opt": Moments(torch.ones(2), torch.zeros(2))}).save(tmp_path / "ckpt")
    keys = ac.load_checkpoint(path).get_variable_to_shape_map()
    assert {"t/.ATTRIBUTES/opt..mu", "t/.ATTRIBUTES/opt..nu"} <= set(keys)


@pytest.mark.parametrize(("make", "error"), [
    (lambda: torch.eye(2).to_sparse(), "to_dense"),
    (lambda: torch.empty(2, device="meta"), "meta device"),
])
def test_variables_refuse_tensors_without_plain_values_by_name(make, error):
    with pytest.raises((TypeError, ValueError), match=error):
        ac.Variable(make())


def test_variables_take_lazy_conjugates_resolved():
    value = torch.tensor([1 + 1j, 2j], dtype=torch.complex64).conj()
    assert ac.Variable(value).numpy().tolist() == [1 - 1j, -2j]
    variable = ac.Variable(np.zeros(2, np.complex64))
    variable.assign(value)
    assert variable.numpy().tolist() == [1 - 1j, -2j]


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.AdamW(params, lr=torch.tensor(0.01)),
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.LBFGS(params),
], ids=["adamw", "sgd", "lbfgs"])
def test_an_optimizers_usual_state_is_encoded_as_the_general_path_encodes_it(make):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
    optimizer = make(model.parameters())

    def closure():
        optimizer.zero_grad()
        loss = model(torch.randn(4, 16)).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
        adapter = torch_objects.OptimizerState(optimizer)
        quick = adapter._serialize_to_tensors()
        general = ac.StateDict._serialize_state(adapter, optimizer.state_dict())  # the general path
        assert quick[torch_objects.STATE_DICT_KEY] == general[torch_objects.STATE_DICT_KEY]
        assert sorted(set(quick) - {torch_objects.PARAMETER_SHAPES_KEY}) == sorted(general)


def test_a_repeat_save_follows_a_parameter_whose_memory_was_replaced_or_changed(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    checkpoint = ac.Checkpoint(model=model, optimizer=optimizer)
    checkpoint.save(tmp_path / "first")
    model[0].weight.data = torch.full((16, 16), 9.0)  # new memory, same shape
    with torch.no_grad():
        optimizer.state[model[0].weight]["exp_avg"].fill_(3.0)  # same memory, new values
    reader = ac.load_checkpoint(checkpoint.save(tmp_path / "second"))
    assert np.all(reader.get_tensor("model/.ATTRIBUTES/0..weight") == 9.0)
    assert np.all(reader.get_tensor("optimizer/.ATTRIBUTES/state..0..exp_avg") == 3.0)


def test_a_forward_during_a_save_passes_over_unset_parameters(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))  # its bias is registered as None
    expected = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train():
        model(torch.randn(2, 16)).sum().backward()
        optimizer.step()

    path = _held_save(ac.Checkpoint(model=model), tmp_path / "ckpt", train)
    assert np.array_equal(ac.load_checkpoint(path).get_tensor("model/.ATTRIBUTES/0..weight"), expected.numpy())


def test_tied_weights_are_saved_once_and_restored_into_the_one_parameter(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 32)
            self.head = torch.nn.Linear(32, 64, bias=False)
            self.head.weight = self.emb.weight

    torch.manual_seed(0)
    source = Tied()
    path = ac.Checkpoint(model=source).save(tmp_path / "ckpt")
    keys = [key for key in ac.load_checkpoint(path).get_variable_to_shape_map() if key.startswith("model/")]
    assert sorted(keys) == ["model/.ATTRIBUTES/STATE_DICT_JSON", "model/.ATTRIBUTES/emb..weight"]
    torch.manual_seed(1)
    fresh = Tied()
    pointer = fresh.emb.weight.data_ptr()
    ac.Checkpoint(model=fresh).restore(path).assert_consumed()
    assert fresh.head.weight is fresh.emb.weight and fresh.emb.weight.data_ptr() == pointer  # read in place
    assert torch.equal(fresh.emb.weight, source.emb.weight)


def test_a_named_tuple_in_a_state_dict_comes_back_as_the_live_states_class(tmp_path):
    from typing import NamedTuple

    class Window(NamedTuple):
        start: int
        scale: float

    class Stateful:
        def __init__(self, window):
            self.window, self.weights = window, torch.ones(32)

        def state_dict(self):
            return {"window": self.window, "weights": self.weights, "history": [Window(0, 0.5)]}

        def load_state_dict(self, state):
            self.loaded = state

    path = ac.Checkpoint(s=Stateful(Window(3, 2.0))).save(tmp_path / "ckpt")
    fresh = Stateful(Window(0, 1.0))
    ac.Checkpoint(s=fresh).restore(path).assert_consumed()
    assert fresh.loaded["window"] == Window(3, 2.0) and type(fresh.loaded["window"]) is Window
    assert type(fresh.loaded["history"][0]) is Window


def test_adams_step_counters_are_saved_as_they_were_at_save(tmp_path):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters())
    _train(model, optimizer, steps=2)
    at_save = {index: (entries["step"].clone(), entries["exp_avg"].clone())
               for index, entries in optimizer.state_dict()["state"].items()}
    path = _held_save(ac.Checkpoint(optimizer=optimizer), tmp_path / "ckpt", lambda: _train(model, optimizer))
    assert float(optimizer.state_dict()["state"][0]["step"]) == 5.0
    fresh = torch.optim.AdamW(Net().parameters())
    ac.Checkpoint(optimizer=fresh).restore(path).assert_consumed()
    for index, (step, exp_avg) in at_save.items():
        assert float(fresh.state_dict()["state"][index]["step"]) == float(step) == 2.0
        assert torch.equal(fresh.state_dict()["state"][index]["exp_avg"], exp_avg)


def test_a_repeat_save_sees_strides_dtypes_and_objects_that_changed_under_the_same_memory(tmp_path):
    model = torch.nn.Linear(4, 4)
    model.register_buffer("counts", torch.arange(32, dtype=torch.float32))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    checkpoint = ac.Checkpoint(model=model, optimizer=optimizer)
    checkpoint.save(tmp_path / "first")
    with torch.no_grad():
        model.weight.copy_(torch.arange(16.0).reshape(4, 4))
        model.weight.t_()  # same memory and size, other strides
    model.counts.data = model.counts.data.view(torch.int32)  # same memory, another dtype
    optimizer.state[model.bias]["exp_avg"] = torch.full((4,), 7.0)  # another tensor object
    optimizer.param_groups[0]["lr"] = 0.5
    second = checkpoint.save(tmp_path / "second")
    reader = ac.load_checkpoint(second)
    assert reader.get_tensor("model/.ATTRIBUTES/weight").tolist() == torch.arange(16.0).reshape(4, 4).t().tolist()
    counts = reader.get_tensor("model/.ATTRIBUTES/counts")
    assert counts.dtype == np.int32 and counts.tolist() == torch.arange(32, dtype=torch.float32).view(torch.int32).tolist()
    assert reader.get_tensor("optimizer/.ATTRIBUTES/state..1..exp_avg").tolist() == [7.0] * 4
    fresh = torch.nn.Linear(4, 4)
    fresh.register_buffer("counts", torch.zeros(32, dtype=torch.int32))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    ac.Checkpoint(model=fresh, optimizer=fresh_optimizer).restore(second).assert_consumed()
    assert fresh_optimizer.param_groups[0]["lr"] == 0.5
    assert torch.equal(fresh_optimizer.state[fresh.bias]["exp_avg"], torch.full((4,), 7.0))
