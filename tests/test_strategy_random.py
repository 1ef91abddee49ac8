"""The strategy's `random` stream: what a `random.seed(seed * 1000 + experience)` gave, and nobody else's."""

from __future__ import annotations

import random

from fedtide.server.sampling import StrategyRandom


def test_the_strategy_draws_what_a_seeded_global_random_gave_across_calls():
    ours = StrategyRandom(seed=7)
    ours.begin_experience(2)
    drawn = []
    for _ in range(3):  # three rounds' configure_train, each sampling 4 of 10 nodes as Flower does
        with ours.drawing():
            drawn.append(random.sample(range(10), 4))
    random.seed(7 * 1000 + 2)
    assert drawn == [random.sample(range(10), 4) for _ in range(3)]


def test_the_process_random_is_neither_seeded_nor_moved_by_the_strategys_draws():
    random.seed(123)
    expected = [random.random() for _ in range(3)]
    random.seed(123)
    ours = StrategyRandom(seed=0)
    ours.begin_experience(0)
    seen = [random.random()]
    with ours.drawing():
        random.sample(range(10), 5)
    seen += [random.random(), random.random()]
    assert seen == expected


def test_a_restored_stream_goes_on_where_the_checkpoint_left_it():
    ours = StrategyRandom(seed=1)
    ours.begin_experience(0)
    with ours.drawing():
        random.random()
    state = ours.getstate()
    with ours.drawing():
        uninterrupted = random.sample(range(100), 5)
    resumed = StrategyRandom(seed=1)
    resumed.setstate(state)
    with resumed.drawing():
        assert random.sample(range(100), 5) == uninterrupted
