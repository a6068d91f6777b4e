"""Sharded values: saved by several ranks (threads with an in-process coordinator), restored with any slicing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt.format import ShardedRecord, parse_manifest, seal_manifest
from _threads import on_ranks

KEY = "w/.ATTRIBUTES/VARIABLE_VALUE"
FULL = np.arange(12 * 10, dtype=np.float32).reshape(12, 10) * 0.5


def _rows(count: int, shape=FULL.shape) -> list[tuple[int, int]]:
    """Uneven row splits: ``count`` (start, stop) pairs covering ``shape[0]``."""
    edges = np.linspace(0, shape[0], count + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:]))


def _save(path):
    def action(rank, coordinator, objects):
        options = ac.CheckpointOptions(multi_worker=ac.MultiWorker.of(coordinator))
        return ac.Checkpoint(**objects).save(path, options=options)
    return action


def _row_sharded(count: int):
    def make(rank):
        start, stop = _rows(count)[rank]
        return {"w": ac.ShardedVariable.shard(FULL[start:stop], global_shape=FULL.shape, offset=(start, 0), name="w"),
                "b": ac.Variable(np.arange(5.0))}
    return make


def _saved_by(tmp_path, count: int) -> str:
    outcomes = on_ranks(count, _row_sharded(count), _save(str(tmp_path / "ckpt")))
    assert set(outcomes.values()) == {str(tmp_path / "ckpt-1")}, outcomes
    return str(tmp_path / "ckpt-1")


def test_two_ranks_save_their_rows_once_and_one_process_restores_the_whole_array(tmp_path):
    path = _saved_by(tmp_path, 2)
    manifest = parse_manifest((tmp_path / "ckpt-1.index").read_bytes(), source="test")
    record = manifest.tensors[KEY]
    assert type(record) is ShardedRecord and record.shape == FULL.shape
    assert [offset for offset, _ in record.shards] == [(0, 0), (6, 0)]
    assert json.loads((tmp_path / "ckpt-1.index").read_bytes())["format_version"] == 2
    whole = ac.Variable(np.zeros_like(FULL))
    ac.Checkpoint(w=whole, b=ac.Variable(np.zeros(5))).restore(path).assert_consumed()
    np.testing.assert_array_equal(whole.numpy(), FULL)
    np.testing.assert_array_equal(ac.load_variable(path, KEY), FULL)
    assert ac.load_checkpoint(path).verify().bytes == FULL.nbytes + 5 * 8 + 8


@pytest.mark.parametrize("boxes", [
    [((0, 0), (4, 10)), ((4, 0), (4, 10)), ((8, 0), (4, 10))],  # 2 -> 3 ranks, uneven against the saved split
    [((0, 0), (12, 3)), ((0, 3), (12, 7))],  # rows -> columns
    [((0, 0), (5, 5)), ((5, 0), (7, 5)), ((0, 5), (12, 5))],  # an irregular tiling
    [((3, 2), (1, 1))],  # one element
])
def test_a_two_rank_checkpoint_restores_into_any_other_slicing(tmp_path, boxes):
    path = _saved_by(tmp_path, 2)
    pieces = [(offset, np.zeros(shape, np.float32)) for offset, shape in boxes]
    target = ac.ShardedVariable(FULL.shape, pieces, name="w")
    ac.Checkpoint(w=target).restore(path).expect_partial()
    for (offset, variable), (_, shape) in zip(target.pieces, boxes):
        box = ac.Box(offset, shape)
        np.testing.assert_array_equal(variable.numpy(), FULL[box.slices()])


def test_a_two_by_two_grid_restores_into_four_column_slices(tmp_path):
    path = str(tmp_path / "grid")

    def make(rank):
        row, column = divmod(rank, 2)
        box = ac.Box((row * 6, column * 5), (6, 5))
        return {"w": ac.ShardedVariable.shard(FULL[box.slices()], global_shape=FULL.shape, offset=box.offset,
                                              name="w")}

    outcomes = on_ranks(4, make, _save(path))
    assert set(outcomes.values()) == {path + "-1"}, outcomes

    def restore(rank, coordinator, objects):
        start, stop = [(0, 2), (2, 5), (5, 7), (7, 10)][rank]
        target = ac.ShardedVariable.shard(np.zeros((12, stop - start), np.float32), global_shape=FULL.shape,
                                          offset=(0, start), name="w")
        ac.Checkpoint(w=target).restore(path + "-1").assert_consumed()
        return np.array_equal(target.local.numpy(), FULL[:, start:stop])

    assert on_ranks(4, lambda rank: {}, restore) == {rank: True for rank in range(4)}


def test_replicated_boxes_are_written_once_by_one_of_their_holders(tmp_path):
    path = str(tmp_path / "replicated")
    # Four ranks in a 2 x 2 mesh: rows split along the first mesh dimension, replicated along the second.
    boxes = {}

    def make(rank):
        row, replica = divmod(rank, 2)
        box = boxes[rank] = ac.Box((row * 6, 0), (6, 10))
        return {"w": ac.ShardedVariable.shard(FULL[box.slices()], global_shape=FULL.shape, offset=box.offset,
                                              replicas=(replica, 2), name="w")}

    outcomes = on_ranks(4, make, _save(path))
    assert set(outcomes.values()) == {path + "-1"}, outcomes
    record = parse_manifest((tmp_path / "replicated-1.index").read_bytes(), source="test").tensors[KEY]
    assert [offset for offset, _ in record.shards] == [(0, 0), (6, 0)]
    data = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(tmp_path)
               for name in names if ".data-" in root)
    assert data == FULL.nbytes + 8  # each box once, and the save counter by one rank
    np.testing.assert_array_equal(ac.load_variable(path + "-1", KEY), FULL)


def test_a_gap_in_the_shards_fails_the_save_on_every_rank_naming_the_key(tmp_path):
    def make(rank):
        start, stop = _rows(2)[rank]
        stop -= rank  # the last rank leaves its last row out
        return {"w": ac.ShardedVariable.shard(FULL[start:stop], global_shape=FULL.shape, offset=(start, 0), name="w")}

    outcomes = on_ranks(2, make, _save(str(tmp_path / "ckpt")))
    for error in outcomes.values():
        assert isinstance(error, ac.CoordinationError), error
        assert KEY in str(error) and "no shard covers [11:12, 0:10]" in str(error)
    assert not (tmp_path / "ckpt-1.index").exists()
    assert not [name for name in os.listdir(tmp_path) if ".data-" in name]


def test_two_ranks_writing_one_box_fail_the_save(tmp_path):
    def make(rank):  # both say nobody else holds the box: it is written twice
        return {"w": ac.ShardedVariable.shard(FULL, global_shape=FULL.shape, offset=(0, 0), name="w")}

    outcomes = on_ranks(2, make, _save(str(tmp_path / "ckpt")))
    for error in outcomes.values():
        assert isinstance(error, ac.CoordinationError), error
        assert "both wrote the shard" in str(error) and KEY in str(error)
    assert not (tmp_path / "ckpt-1.index").exists()


def test_a_lone_process_cannot_commit_part_of_a_sharded_value(tmp_path):
    variable = ac.ShardedVariable.shard(FULL[:6], global_shape=FULL.shape, offset=(0, 0), name="w")
    with pytest.raises(ValueError, match=r"no shard covers \[6:12, 0:10\]"):
        ac.Checkpoint(w=variable).save(str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt-1.index").exists()
    assert not [name for name in os.listdir(tmp_path) if ".data-" in name]


def test_a_sharded_restore_refuses_another_global_shape_or_dtype_before_reading(tmp_path):
    path = _saved_by(tmp_path, 2)
    wrong_shape = ac.ShardedVariable.shard(np.zeros((2, 10), np.float32), global_shape=(13, 10), offset=(0, 0))
    with pytest.raises(ValueError, match=r"global shape \(12, 10\)"):
        ac.Checkpoint(w=wrong_shape).restore(path)
    wrong_dtype = ac.ShardedVariable.shard(np.zeros((2, 10), np.float64), global_shape=(12, 10), offset=(0, 0))
    with pytest.raises(ValueError, match="dtype float32"):
        ac.Checkpoint(w=wrong_dtype).restore(path)


def test_a_whole_checkpoint_restores_into_shards_and_back(tmp_path):
    path = ac.Checkpoint(w=ac.Variable(FULL)).save(str(tmp_path / "whole"))
    target = ac.ShardedVariable.shard(np.zeros((5, 4), np.float32), global_shape=FULL.shape, offset=(3, 6))
    ac.Checkpoint(w=target).restore(path).assert_consumed()
    np.testing.assert_array_equal(target.local.numpy(), FULL[3:8, 6:10])


def test_repeated_saves_see_new_values_of_the_pieces(tmp_path):
    variable = ac.ShardedVariable(FULL.shape, [((0, 0), FULL[:6]), ((6, 0), FULL[6:])], name="w")
    checkpoint = ac.Checkpoint(w=variable)
    checkpoint.save(str(tmp_path / "ckpt"))
    variable.pieces[1][1].assign(np.full((6, 10), 7, np.float32))
    path = checkpoint.save(str(tmp_path / "ckpt"))
    saved = ac.load_variable(path, KEY)
    np.testing.assert_array_equal(saved[:6], FULL[:6])
    assert (saved[6:] == 7).all()


def test_a_save_writes_what_the_pieces_held_when_it_was_called(tmp_path):
    variable = ac.ShardedVariable(FULL.shape, [((0, 0), FULL[:6]), ((6, 0), FULL[6:])], name="w")
    checkpoint = ac.Checkpoint(w=variable)
    path = checkpoint.save(str(tmp_path / "ckpt"), options=ac.CheckpointOptions(enable_async=True))
    variable.pieces[0][1].assign_add(np.ones((6, 10), np.float32))  # while the write may be under way
    checkpoint.sync()
    np.testing.assert_array_equal(ac.load_variable(path, KEY), FULL)


# ---------------------------------------------------------------------------------------------
# Partial reads verify what they touch


def _big_sharded_checkpoint(tmp_path) -> tuple[str, np.ndarray]:
    """A value of 4 MiB in two shards, each in 1 MiB extents (one chunk file per extent)."""
    full = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    variable = ac.ShardedVariable(full.shape, [((0, 0), full[:512]), ((512, 0), full[512:])], name="w")
    settings = ac.WriteSettings(chunk_bytes=1 << 20)
    path = ac.Checkpoint(w=variable).save(str(tmp_path / "ckpt"),
                                          options=ac.CheckpointOptions(write_settings=settings))
    return path, full


def _flip(tmp_path, extent) -> None:
    data_dir = [name for name in os.listdir(tmp_path) if ".data-" in name][0]
    with open(tmp_path / data_dir / extent.file, "r+b") as handle:
        handle.seek(extent.offset + extent.length // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x40]))


def test_a_flipped_byte_is_caught_by_a_partial_read_that_touches_its_extent(tmp_path):
    path, full = _big_sharded_checkpoint(tmp_path)
    record = parse_manifest((tmp_path / "ckpt-1.index").read_bytes(), source="test").tensors[KEY]
    second_shard = record.shards[1][1]
    assert len(second_shard.extents) == 2
    _flip(tmp_path, second_shard.extents[1])  # rows 768..1023
    reader = ac.load_checkpoint(path)
    untouched = reader.read_boxes(KEY, [ac.Box((0, 0), (768, 1024))])[0]  # needs no byte of that extent
    np.testing.assert_array_equal(untouched, full[:768])
    with pytest.raises(ac.CorruptCheckpointError, match="fails its checksum"):
        reader.read_boxes(KEY, [ac.Box((900, 100), (1, 1))])  # one element inside the damaged extent
    with pytest.raises(ac.CorruptCheckpointError):
        reader.verify()


def test_a_column_slice_reads_every_row_and_verifies_it(tmp_path):
    path, full = _big_sharded_checkpoint(tmp_path)
    reader = ac.load_checkpoint(path)
    got = reader.read_boxes(KEY, [ac.Box((0, 1000), (1024, 24)), ac.Box((100, 0), (3, 1024))])
    np.testing.assert_array_equal(got[0], full[:, 1000:])
    np.testing.assert_array_equal(got[1], full[100:103])


def test_read_boxes_refuses_a_box_outside_the_value_and_a_wrong_destination(tmp_path):
    path = _saved_by(tmp_path, 2)
    reader = ac.load_checkpoint(path)
    with pytest.raises(ValueError, match=r"box \[10:13, 0:1\] is not inside"):
        reader.read_boxes(KEY, [ac.Box((10, 0), (3, 1))])
    with pytest.raises(ValueError, match="writable C-contiguous"):
        reader.read_boxes(KEY, [ac.Box((0, 0), (2, 2))], out=[np.zeros((2, 2), np.float64)])
    into = np.zeros((2, 2), np.float32)
    assert reader.read_boxes(KEY, [ac.Box((0, 0), (2, 2))], out=[into])[0] is into


# ---------------------------------------------------------------------------------------------
# The manifest's shards are untrusted


def _sharded_manifest(tmp_path) -> dict:
    _saved_by(tmp_path, 2)
    document = json.loads((tmp_path / "ckpt-1.index").read_bytes())
    return document


def _reparsed(document) -> None:
    parse_manifest(seal_manifest(document), source="edited")


def test_overlapping_or_missing_shards_in_a_manifest_are_corrupt(tmp_path):
    document = _sharded_manifest(tmp_path)
    shards = document["tensors"][KEY]["shards"]
    shards[1]["offset"] = [5, 0]
    with pytest.raises(ac.CorruptCheckpointError, match=r"overlap at \[5:6, 0:10\]"):
        _reparsed(document)
    shards[1]["offset"] = [7, 0]
    with pytest.raises(ac.CorruptCheckpointError, match="lies outside"):
        _reparsed(document)
    del shards[1]
    with pytest.raises(ac.CorruptCheckpointError, match=r"no shard covers \[6:12, 0:10\]"):
        _reparsed(document)


def test_shards_in_a_version_1_manifest_are_refused(tmp_path):
    document = _sharded_manifest(tmp_path)
    document["format_version"] = 1
    with pytest.raises(ac.CorruptCheckpointError, match=r"lacks field\(s\) \['crc32c', 'extents', 'nbytes'\]"):
        _reparsed(document)


def test_a_checkpoint_without_sharded_values_is_still_version_1(tmp_path):
    path = ac.Checkpoint(w=ac.Variable(FULL)).save(str(tmp_path / "plain"))
    with open(path + ".index", "rb") as index:
        assert json.loads(index.read())["format_version"] == 1


def test_a_key_with_a_nul_character_is_refused():
    import asyncckpt.io as ckio
    with pytest.raises(ValueError, match="NUL"):
        ckio.prepare_write([ckio.SaveEntry("a\x00b", np.zeros(1))], {})


def _replicated_rows(values_of_rank):
    """Four ranks, rows split in two, each half replicated on two ranks holding ``values_of_rank(rank)``."""
    def make(rank):
        row, replica = divmod(rank, 2)
        box = ac.Box((row * 6, 0), (6, 10))
        return {"w": ac.ShardedVariable.shard(values_of_rank(rank)[box.slices()], global_shape=FULL.shape,
                                              offset=box.offset, replicas=(replica, 2), name="w")}
    return make


def _save_checking_replicas(path):
    def action(rank, coordinator, objects):
        options = ac.CheckpointOptions(multi_worker=ac.MultiWorker.of(coordinator, check_replicas=True))
        return ac.Checkpoint(**objects).save(path, options=options)
    return action


def test_check_replicas_passes_when_the_holders_of_each_box_agree(tmp_path):
    path = str(tmp_path / "ckpt")
    outcomes = on_ranks(4, _replicated_rows(lambda rank: FULL), _save_checking_replicas(path))
    assert set(outcomes.values()) == {path + "-1"}, outcomes


def test_check_replicas_names_a_box_whose_holders_differ(tmp_path):
    def values(rank):
        return FULL + 1 if rank == 3 else FULL  # rank 3 holds the lower half, replicated with rank 2

    outcomes = on_ranks(4, _replicated_rows(values), _save_checking_replicas(str(tmp_path / "ckpt")))
    for error in outcomes.values():
        assert isinstance(error, ac.CoordinationError), error
        assert "the holders of a box differ" in str(error) and "at [6, 0] (ranks [2, 3])" in str(error)
    assert not (tmp_path / "ckpt-1.index").exists()


# ---------------------------------------------------------------------------------------------
# Any slicing in, any boxes out (hypothesis)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_shards_properties import box_in, grid_split  # noqa: E402


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grid_split(), st.data())
def test_boxes_read_from_any_slicing_equal_numpy_slices(tmp_path_factory, split, data):
    shape, boxes = split
    full = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 1.5
    folder = tmp_path_factory.mktemp("boxes")
    variable = ac.ShardedVariable(shape, [(box.offset, full[box.slices()]) for box in boxes], name="w")
    settings_ = ac.WriteSettings(chunk_bytes=64, small_array_bytes=16)  # many small extents
    path = ac.Checkpoint(w=variable).save(str(folder / "ckpt"), options=ac.CheckpointOptions(write_settings=settings_))
    reader = ac.load_checkpoint(path)
    wanted = data.draw(st.lists(box_in(shape), min_size=1, max_size=4))
    for box, got in zip(wanted, reader.read_boxes(KEY, wanted)):
        np.testing.assert_array_equal(got, full[box.slices()])
    np.testing.assert_array_equal(reader.read(KEY), full)


def test_ranks_past_an_uneven_split_hold_empty_boxes_and_the_save_still_commits(tmp_path):
    """As DTensor splits 2 rows over 4 ranks: ranks 2 and 3 both hold the empty box at row 2."""
    rows = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    starts = [0, 1, 2, 2]

    def make(rank):
        start = starts[rank]
        piece = rows[start:start + (1 if rank < 2 else 0)]
        return {"w": ac.ShardedVariable.shard(piece, global_shape=rows.shape, offset=(start, 0), name="w")}

    outcomes = on_ranks(4, make, _save(str(tmp_path / "ckpt")))
    assert set(outcomes.values()) == {str(tmp_path / "ckpt-1")}, outcomes
    np.testing.assert_array_equal(ac.load_variable(str(tmp_path / "ckpt-1"), KEY), rows)
