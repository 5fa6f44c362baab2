"""The checkpointer's save policy, decision by decision, against steps worked out by hand."""

from dlrm_torchrec.config import CheckpointConfig
from dlrm_torchrec.train.checkpoint import Checkpointer


def _policy(**overrides):
    saved = []
    state = {"step": 0}
    policy = Checkpointer(CheckpointConfig(**overrides), lambda: saved.append(state["step"]))
    return policy, saved, state


def _at(policy, state, step, call, *args, **kwargs):
    state["step"] = step
    getattr(policy, call)(step, *args, **kwargs)


def test_periodic_saves_fall_on_multiples_of_every_n_steps_and_once_at_the_end():
    policy, saved, state = _policy(every_n_steps=4, at_end=True, keep_best=False)
    for step in (2, 4, 6, 8, 10):
        _at(policy, state, step, "after_interval", new_best=False)
    _at(policy, state, 10, "at_finish", signalled=False)
    assert saved == [4, 8, 10]
    # a run that ends on a periodic step is not saved twice
    _at(policy, state, 12, "after_interval", new_best=False)
    _at(policy, state, 12, "at_finish", signalled=False)
    assert saved == [4, 8, 10, 12]


def test_intervals_end_at_the_next_periodic_save():
    policy, _, _ = _policy(every_n_steps=5)
    assert [policy.steps_to_next_periodic(s) for s in (0, 3, 5, 9)] == [5, 2, 5, 1]
    assert _policy(every_n_steps=0)[0].steps_to_next_periodic(7) is None


def test_a_new_best_is_saved_only_when_the_run_checkpoints_and_keeps_the_best():
    policy, saved, state = _policy(every_n_steps=0, at_end=True, keep_best=True)
    _at(policy, state, 3, "after_interval", new_best=True)
    _at(policy, state, 6, "after_interval", new_best=False)
    _at(policy, state, 9, "after_evaluation", new_best=True)
    assert saved == [3, 9]

    policy, saved, state = _policy(every_n_steps=0, at_end=False, keep_best=True)
    _at(policy, state, 3, "after_interval", new_best=True)  # checkpointing is off
    _at(policy, state, 6, "at_finish", signalled=False)
    assert saved == []

    policy, saved, state = _policy(every_n_steps=0, at_end=True, keep_best=False)
    _at(policy, state, 3, "after_interval", new_best=True)
    assert saved == []


def test_a_signal_saves_even_without_at_end_and_a_resumed_step_is_not_saved_again():
    policy, saved, state = _policy(every_n_steps=0, at_end=False)
    _at(policy, state, 7, "at_finish", signalled=True)
    assert saved == [7]

    policy, saved, state = _policy(every_n_steps=5, at_end=True)
    policy.resumed(10)
    _at(policy, state, 10, "after_interval", new_best=False)
    _at(policy, state, 10, "at_finish", signalled=True)
    assert saved == []
    _at(policy, state, 15, "after_interval", new_best=False)
    assert saved == [15]
