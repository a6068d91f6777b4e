"""``RandomState`` reads its saved generator state as untrusted data."""

from __future__ import annotations

import random

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt.model.adapters import typed_json


def test_a_generator_array_of_a_non_number_dtype_is_refused_before_allocating():
    holder = ac.RandomState(np.random.Generator(np.random.MT19937(1)))
    hostile = {"kind": "numpy.MT19937",
               "state": {"bit_generator": "MT19937", "state": {"key": ("ndarray", "S20000000", [0] * 10), "pos": 0}}}
    with pytest.raises(ValueError, match="dtype 'S20000000'"):
        holder.deserialize(typed_json.dumps(hostile))


@pytest.mark.parametrize(("document", "error"), [
    ({"kind": "python"}, "holds no generator state"),
    ({"kind": "python", "state": (3, (1, 2), None)}, "not one the generator takes"),
    ({"kind": "numpy.PCG64"}, "'numpy.PCG64' generator, not of a 'python' one"),
])
def test_a_malformed_state_is_a_value_error_naming_the_generator(document, error):
    holder = ac.RandomState(random.Random(1))
    with pytest.raises(ValueError, match=error):
        holder.deserialize(typed_json.dumps(document))
    assert holder.generator.random() == random.Random(1).random()  # unchanged


def test_a_saved_numpy_generator_resumes_its_draws(tmp_path):
    generator = np.random.default_rng(7)
    generator.random(3)
    path = ac.Checkpoint(rng=ac.RandomState(generator)).save(tmp_path / "ckpt")
    expected = generator.random(4)
    fresh = np.random.default_rng(0)
    ac.Checkpoint(rng=ac.RandomState(fresh)).restore(path).assert_consumed()
    assert np.array_equal(fresh.random(4), expected)
