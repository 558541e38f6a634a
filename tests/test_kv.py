"""The running batch's key/value storage: written in place, grown geometrically, rows joining and
leaving without copying the others; and the engine's answers unchanged by it."""

from __future__ import annotations

import pytest
import torch

from videollava.infer.engine import Engine
from videollava.infer.kv import MIN_COLUMNS, KVLayout, PrefixCache, RunningBatch
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams

LAYOUT = KVLayout(layers=2, heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))


class Model:
    """What each row should hold, position by position, kept apart from the batch under test."""

    def __init__(self, batch: RunningBatch):
        self.batch = batch
        self.rows: list[list[torch.Tensor]] = []  # per row: per layer (2, heads, n, d) keys and values
        self._seed = 0

    def _random(self, rows: int, n: int) -> list[torch.Tensor]:
        self._seed += 1
        generator = torch.Generator().manual_seed(self._seed)
        shape = (2, rows, LAYOUT.heads, n, LAYOUT.head_dim)
        return [torch.randn(shape, generator=generator) for _ in range(LAYOUT.layers)]

    def join(self, n: int) -> None:
        """A row of `n` positions joins (as a fully reused prefix would)."""
        fresh = [t[:, 0] for t in self._random(1, n)]  # per layer (2, heads, n, d)
        slot = self.batch.reserve(n)
        assert slot == self.batch.size
        self.batch.write_prefix([(t[0][None], t[1][None]) for t in fresh])
        self.batch.admit()
        self.rows.append(fresh)

    def step(self) -> None:
        """One decoding step: a new position for every row, written through the step's cache."""
        size = self.batch.size
        new = self._random(size, 1)  # per layer (2, B, heads, 1, d)
        mask = self.batch.step_mask()
        assert mask.shape == (size, self.batch.length + 1) and bool(mask[:, -1].all())
        cache = self.batch.step_cache()
        for index, t in enumerate(new):
            keys, values = cache.update(t[0], t[1], index)
            assert keys.shape == (size, LAYOUT.heads, self.batch.length + 1, LAYOUT.head_dim)
            assert keys.untyped_storage().data_ptr() == self.batch.keys[index].untyped_storage().data_ptr()
        self.batch.commit()
        for row, kv in enumerate(self.rows):
            self.rows[row] = [torch.cat([old, t[:, row]], dim=2) for old, t in zip(kv, new, strict=True)]

    def leave(self, rows: list[int]) -> list[int]:
        order = self.batch.remove(rows)
        self.rows = [self.rows[i] for i in order]
        return order

    def check(self) -> None:
        """Every row holds exactly its positions, left-padded with zeros in the shared window."""
        batch = self.batch
        assert batch.size == len(self.rows)
        mask = batch.mask
        for row, kv in enumerate(self.rows):
            n = kv[0].shape[2]
            assert mask[row].tolist() == [False] * (batch.length - n) + [True] * n
            for index, expected in enumerate(kv):
                keys = batch.keys[index][row, :, batch.start : batch.end]
                values = batch.values[index][row, :, batch.start : batch.end]
                assert torch.equal(keys[:, batch.length - n :], expected[0])
                assert torch.equal(values[:, batch.length - n :], expected[1])
                assert not keys[:, : batch.length - n].any() and not values[:, : batch.length - n].any()
            for index, (k, v) in enumerate(batch.row_layers(row)):
                assert torch.equal(k[0], kv[index][0]) and torch.equal(v[0], kv[index][1])
        if batch.size:  # no leading column is padding in every row
            assert bool(mask[:, 0].any())


def pointers(batch: RunningBatch) -> list[int]:
    return [t.data_ptr() for t in batch.keys + batch.values]


def test_steps_write_in_place_and_columns_grow_geometrically():
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    model.join(5)
    model.check()
    assert batch.column_capacity == MIN_COLUMNS
    capacities, in_place = [MIN_COLUMNS], 0
    for _ in range(4 * MIN_COLUMNS):
        before, capacity, length, grown = (
            pointers(batch),
            batch.column_capacity,
            batch.length,
            batch.copies.grow,
        )
        fits = batch.end + 1 <= capacity
        model.step()
        if fits:  # the step wrote its column into the buffers it found, and copied nothing
            assert pointers(batch) == before and batch.copies.grow == grown
            in_place += 1
        else:  # the window was copied once into buffers twice as wide
            assert pointers(batch) != before
            assert batch.column_capacity == 2 * capacity and batch.copies.grow == grown + length
            capacities.append(batch.column_capacity)
    model.check()
    assert capacities == [MIN_COLUMNS, 2 * MIN_COLUMNS, 4 * MIN_COLUMNS, 8 * MIN_COLUMNS]
    assert in_place == 4 * MIN_COLUMNS - 3


def test_rows_grow_geometrically_and_only_growth_moves_the_buffers():
    batch = RunningBatch(LAYOUT, max_rows=6)
    model = Model(batch)
    capacities = []
    for n in [3, 4, 2, 5, 3, 4]:
        before, grown = pointers(batch), batch.copies.grow
        had_room, running, length = batch.size < batch.row_capacity, batch.size, batch.length
        model.join(n)
        model.step()
        capacities.append(batch.row_capacity)
        if had_room:
            assert pointers(batch) == before and batch.copies.grow == grown
        else:  # the running rows were copied once, as they were
            assert batch.copies.grow == grown + running * max(length, n) or running == 0
    model.check()
    assert capacities == [1, 2, 4, 4, 6, 6]  # doubling, up to max_rows


def test_a_shorter_row_joins_in_place_as_left_padding():
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    for n in (10, 6, 8):  # three rows: room for a fourth
        model.join(n)
    for _ in range(3):
        model.step()
    before, start, end = pointers(batch), batch.start, batch.end
    copies = (batch.copies.grow, batch.copies.join, batch.copies.leave)
    model.join(4)
    model.check()
    assert pointers(batch) == before and (batch.start, batch.end) == (start, end)
    assert (batch.copies.grow, batch.copies.join, batch.copies.leave) == (copies[0], copies[1] + 4, 0)
    model.step()
    model.check()


def test_a_longer_row_extends_the_window_into_spare_columns_without_copying():
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    for n in (6, 4, 5):  # three rows: room for a fourth
        model.join(n)
    model.step()
    spare = batch.start  # the first allocation leaves room on the left
    assert spare > 3
    before, end, grown = pointers(batch), batch.end, batch.copies.grow
    model.join(batch.length + spare)  # uses all of it
    model.check()  # the other rows' new leading cells are zeros, not stale data
    assert pointers(batch) == before and batch.start == 0 and batch.end == end
    assert batch.copies.grow == grown
    model.step()
    model.check()


def test_a_row_longer_than_the_buffers_allow_costs_one_reallocation():
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    for n in (6, 3):
        model.join(n)
    model.step()
    running, length, before, grown = batch.size, batch.length, pointers(batch), batch.copies.grow
    model.join(3 * MIN_COLUMNS)  # needs a third row slot and more columns: one reallocation for both
    model.check()
    assert pointers(batch) != before
    assert batch.copies.grow == grown + running * length  # the running rows' window, copied once
    grown = batch.copies.grow
    for _ in range(5):
        model.step()
    model.check()
    assert batch.copies.grow == grown


@pytest.mark.parametrize("leaving", [[0], [1], [3], [0, 3], [1, 2], [0, 1, 2, 3]])
def test_rows_leave_moving_only_the_last_row(leaving):
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    for n in (7, 3, 9, 5):
        model.join(n)
        model.step()
    before, copies = pointers(batch), batch.copies.leave
    rows_before = [[t.clone() for t in kv] for kv in model.rows]
    length = batch.length
    order = model.leave(leaving)
    model.check()  # every row left holds exactly what it held
    assert order == _expected_order(4, leaving)
    assert [kv[0].shape for kv in model.rows] == [rows_before[i][0].shape for i in order]
    if batch.size:
        assert pointers(batch) == before  # no reallocation: the others' cells stayed where they were
    # a row is copied only to fill a hole that is not at the end
    moved = sum(1 for new, old in enumerate(order) if new != old)
    assert batch.copies.leave - copies == moved * length
    if batch.size:
        model.step()
        model.check()


def _expected_order(size: int, leaving: list[int]) -> list[int]:
    """Holes below the new size are filled, in order, by the rows that stay above it."""
    left = size - len(leaving)
    movers = iter(row for row in range(left, size) if row not in leaving)
    return [next(movers) if row in leaving else row for row in range(left)]


def test_leading_columns_no_row_uses_are_dropped_without_copying():
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    model.join(4)
    model.join(20)
    model.step()
    before, end = pointers(batch), batch.end
    assert batch.length == 21
    model.leave([1])  # the long row was the last: nothing moves
    model.check()
    assert batch.length == 5 and batch.end == end and pointers(batch) == before
    assert batch.copies.leave == 0


def test_a_window_in_few_columns_moves_left_instead_of_growing():
    """Rows come and go, so the window drifts right; at the buffers' end it moves back left."""
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    model.join(2)
    model.join(3)
    capacity = batch.column_capacity
    steps = 0
    while batch.end + 1 <= capacity:
        model.step()
        steps += 1
        if steps % 8 == 0:  # the older row finishes, a new one takes its place
            model.leave([0])
            model.join(2)
    before, length, grown = pointers(batch), batch.length, batch.copies.grow
    assert 2 * (length + 1) <= capacity
    model.step()
    model.check()
    assert batch.column_capacity == capacity and pointers(batch) != before
    assert batch.copies.grow == grown + batch.size * length and batch.start < capacity // 2


def test_a_failed_step_leaves_its_column_uncounted():
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    model.join(5)
    model.join(3)
    model.step()
    end = batch.end
    batch.step_mask()
    cache = batch.step_cache()
    cache.update(torch.full((2, 2, 1, 3), float("nan")), torch.full((2, 2, 1, 3), float("nan")), 0)
    # ... the forward raised before the other layers: no commit
    assert batch.end == end
    model.check()
    model.step()  # the next step writes that column for real
    model.check()


def test_a_joining_row_whose_prefill_fails_leaves_the_batch_as_it_was():
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    model.join(4)
    model.step()
    batch.reserve(30)  # extends the window to the left ...
    batch.abort()  # ... and the prefill failed
    model.check()
    assert batch.length == 5


def test_row_cache_steps_one_row_alone_over_its_real_positions():
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    model.join(8)
    model.join(3)
    model.step()
    cache, length = batch.row_cache(1)
    assert length == 4
    k = torch.randn(1, 2, 1, 3)
    keys, _ = cache.update(k, k, 0)
    assert keys.shape == (1, 2, 5, 3) and torch.equal(keys[0, :, :4], model.rows[1][0][0])
    assert torch.equal(keys[0, :, 4:], k[0])
    model.check()  # uncounted: the rows are as they were


def test_stored_prefixes_are_copies_made_only_when_stored():
    batch = RunningBatch(LAYOUT)
    model = Model(batch)
    model.join(6)
    model.step()
    cache = PrefixCache()
    views = batch.row_layers(0)
    assert cache.put([1, 2, 3], [2, 2, 3], views, copy=True)
    assert cache.copied_positions == 7
    assert not cache.put([1, 2], [2, 2], [(k[:, :, :4], v[:, :, :4]) for k, v in views], copy=True)
    assert cache.copied_positions == 7  # covered: nothing copied
    rows, layers = cache.longest([1, 2, 3, 4], max_rows=10)
    assert rows == 7
    buffers = {t.untyped_storage().data_ptr() for t in batch.keys + batch.values}
    assert all(t.untyped_storage().data_ptr() not in buffers for kv in layers for t in kv)
    expected = [(k.clone(), v.clone()) for k, v in views]
    model.leave([0])
    model.join(7)  # the slot is written again
    for (k, v), (k0, v0) in zip(layers, expected, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)


# --------------------------------------------------------------------------------------------
# the engine over this storage


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint):
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


@pytest.fixture()
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "blue.png"
    Image.new("RGB", (40, 30), (20, 20, 200)).save(path)
    return MediaItem("image", str(path))


def _run(engine: Engine, handles) -> None:
    while not all(h.done for h in handles):
        engine.step()


def test_greedy_tokens_in_a_changing_batch_equal_each_request_alone(pipeline, image):
    """Rows of different lengths join and leave mid-way (a longer one extends the window, a finished
    one is replaced); every answer is exactly the one it gets alone, in float32."""
    questions = [("Hi?", 9), ("What colour is it?", 4), ("Describe. " * 6, 12), ("Say something.", 7)]
    prepared = [pipeline.prepare(pipeline.build_prompt(q, 0, 0), []) for q, _ in questions]
    prepared.append(pipeline.prepare(pipeline.build_prompt("What is it?", 1, 0), [image]))
    tokens = [n for _, n in questions] + [6]
    params = [SamplingParams(max_new_tokens=n) for n in tokens]
    alone = [
        Engine.for_pipeline(pipeline, prefix_cache_bytes=0).generate([p], s)[0].token_ids
        for p, s in zip(prepared, params, strict=True)
    ]
    engine = Engine.for_pipeline(pipeline, max_batch_size=3, prefix_cache_bytes=0)
    handles = [engine.submit(prepared[0], params[0]), engine.submit(prepared[1], params[1])]
    engine.step()
    engine.step()
    handles.append(engine.submit(prepared[2], params[2]))  # longer than the window: extends it left
    engine.step()
    handles += [engine.submit(p, s) for p, s in zip(prepared[3:], params[3:], strict=True)]
    _run(engine, handles)  # the last two wait for rows to leave, then take their slots
    assert [h.result().token_ids for h in handles] == alone
    assert all(len(ids) > 1 for ids in alone)
    assert engine._batch.size == 0


def test_decoding_writes_the_running_rows_in_place(pipeline):
    engine = Engine.for_pipeline(pipeline, max_batch_size=4)
    prompts = [pipeline.prepare(pipeline.build_prompt(q, 0, 0), []) for q in ("Hi?", "Say something.")]
    handles = [engine.submit(p, SamplingParams(max_new_tokens=12)) for p in prompts]
    engine.step()
    batch = engine._batch
    assert batch.size == 2
    before, capacity = pointers(batch), batch.column_capacity
    for _ in range(8):
        if batch.end + 1 > capacity or any(h.done for h in handles):
            break
        grown = batch.copies.total()
        engine.step()
        assert pointers(batch) == before and batch.copies.total() == grown
    _run(engine, handles)


def test_the_same_question_again_joins_from_the_prefix_cache_without_a_prefill(pipeline, image):
    engine = Engine.for_pipeline(pipeline)
    prompt = pipeline.prepare(pipeline.build_prompt("What is it?", 1, 0), [image])
    params = SamplingParams(max_new_tokens=5)
    first = engine.generate([prompt], params)[0]
    decoder = pipeline.model.language_model.get_decoder()
    calls = []
    hook = decoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        again = [engine.submit(prompt, params) for _ in range(3)]
        engine.step()
        assert calls == [1]  # one forward: the decoding step that all three joined
        _run(engine, again)
    finally:
        hook.remove()
    assert all(h.result().token_ids == first.token_ids for h in again)
    assert all(h.result().reused_prefix_tokens == prompt.prompt_tokens - 1 for h in again)
