"""The per-step commit rule shared by both decoders, and the stats it feeds."""

from __future__ import annotations

from dspark.decode.types import DecodeStats, commit_step

STOP = {9}


def test_all_accepted_then_bonus():
    c = commit_step([1, 2, 3], 3, 4, STOP)
    assert (c.tokens, c.accepted, c.drafted, c.extra, c.stopped) == ([1, 2, 3, 4], 3, 3, "bonus", False)


def test_rejection_emits_the_recovered_token():
    c = commit_step([1], 3, 7, STOP)
    assert (c.tokens, c.accepted, c.drafted, c.extra, c.stopped) == ([1, 7], 1, 3, "recovered", False)


def test_stop_accepted_mid_block_cuts_the_rest_out_of_the_counts():
    c = commit_step([1, 9, 3], 3, 4, STOP)
    assert (c.tokens, c.accepted, c.drafted, c.extra, c.stopped) == ([1, 9], 2, 2, None, True)


def test_stop_as_the_recovered_token_and_nothing_may_follow():
    c = commit_step([1], 2, 9, STOP)
    assert (c.tokens, c.accepted, c.drafted, c.extra, c.stopped) == ([1, 9], 1, 2, "recovered", True)
    dead = commit_step([1, 2], 2, None, STOP)  # a grammar allows no token after the drafts
    assert (dead.tokens, dead.accepted, dead.extra) == ([1, 2], 2, None)


def test_stats_keep_accepted_plus_recovered_plus_bonus_equal_to_generated():
    st = DecodeStats()
    generated = 0
    for c in (commit_step([1, 2], 3, 5, STOP), commit_step([1, 2, 3], 3, 4, STOP), commit_step([9], 3, 4, STOP)):
        st.record_step(c, verify_s=0.5, draft_forwards=3, draft_s=0.1)
        generated += len(c.tokens)
    assert st.accepted + st.recovered + st.bonus == generated == 3 + 4 + 1
    assert (st.drafted, st.accepted, st.recovered, st.bonus, st.verify_steps) == (3 + 3 + 1, 2 + 3 + 1, 1, 1, 3)
    assert st.drafted_per_position == [3, 2, 2] and st.accepted_per_position == [3, 2, 1]
    assert st.target_time_s == 1.5 and st.draft_forwards == 9
