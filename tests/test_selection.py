import pytest
import torch

from sdt import SelectionError, select_channels_and_states, select_heads_and_rows, top_indices


def test_top_indices_best_first_and_ties_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    assert top_indices(scores, 2).tolist() == [1, 2]
    assert top_indices(scores, 4).tolist() == [1, 2, 4, 0]
    assert top_indices(torch.tensor([[0.0, 2.0, 2.0], [5.0, 5.0, 1.0]]), 1).tolist() == [[1], [0]]


def test_channels_by_summed_squares_and_own_states_per_channel():
    delta = torch.zeros(6, 4)
    delta[4] = torch.tensor([0.0, 3.0, 0.0, 1.0])  # score 10
    delta[1] = torch.tensor([-2.0, 0.0, 2.0, 0.0])  # score 8 (signs do not matter)
    delta[2] = torch.tensor([0.0, 0.0, 0.0, 2.5])  # score 6.25
    delta[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # score 1
    sel = select_channels_and_states(delta, n_channels=3, n_states=2)
    assert sel["channels"].tolist() == [4, 1, 2]
    # each channel its own states: channel 4 -> 1 then 3; channel 1 -> tie 0/2; channel 2 -> 3 then tie 0
    assert sel["states"].tolist() == [[1, 3], [0, 2], [3, 0]]


def test_channel_ties_are_deterministic():
    delta = torch.ones(5, 3)
    delta[3] *= 2
    sel = select_channels_and_states(delta, n_channels=3, n_states=3)
    assert sel["channels"].tolist() == [3, 0, 1]
    assert sel["states"].tolist() == [[0, 1, 2]] * 3


def test_all_zero_or_nan_update_is_refused():
    with pytest.raises(SelectionError, match="all zero"):
        select_channels_and_states(torch.zeros(4, 2), 1, 1, name="layers.0.A_log")
    bad = torch.ones(4, 2)
    bad[1, 1] = float("nan")
    with pytest.raises(SelectionError, match="NaN"):
        select_channels_and_states(bad, 1, 1)


def test_mamba2_heads_groups_rows_and_inputs():
    # 4 heads in 2 groups (2 heads each), 3 states, 4 hidden inputs
    delta_a = torch.tensor([0.1, 0.0, 0.0, -0.5])  # head 3 (group 1) then head 0 (group 0)
    delta_b = torch.zeros(2, 3, 4)
    delta_c = torch.zeros(2, 3, 4)
    delta_b[0, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    delta_c[0, 1] = torch.tensor([0.5, 0.0, 0.0, 0.0])
    delta_b[1, 0] = torch.tensor([0.0, 0.0, 2.0, 1.0])
    delta_c[1, 0] = torch.tensor([0.0, 3.0, 0.0, 0.0])
    sel = select_heads_and_rows(delta_a, delta_b, delta_c, n_heads=2, n_states=2, n_inputs=2, heads_per_group=2)
    assert sel["channels"].tolist() == [3, 0]
    assert sel["groups"].tolist() == [0, 1]
    # group 0: row 2 (1.0) then row 1 (0.25); group 1: row 0 (14.0) then tie between rows 1, 2 -> 1
    assert sel["states"].tolist() == [[2, 1], [0, 1]]
    # row (0,2): input 1 then tie -> 0; row (0,1): input 0 then 1; row (1,0): inputs 1 (9), 2 (4)
    assert sel["inputs"][0].tolist() == [[1, 0], [0, 1]]
    assert sel["inputs"][1, 0].tolist() == [1, 2]


def test_mamba2_only_groups_with_selected_heads():
    delta_a = torch.tensor([0.0, 0.0, 1.0, 0.0])
    sel = select_heads_and_rows(
        delta_a, torch.ones(2, 3, 4), torch.ones(2, 3, 4), n_heads=1, n_states=1, n_inputs=1, heads_per_group=2
    )
    assert sel["groups"].tolist() == [1]
    assert sel["states"].shape == (1, 1) and sel["inputs"].shape == (1, 1, 1)
