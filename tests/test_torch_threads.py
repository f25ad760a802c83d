"""torch_threads: the process's thread count is put back, also when the block raises."""

import pytest
import torch

from mergekit_sd.torch_threads import torch_threads


def test_count_inside_and_put_back_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("stop")
    assert torch.get_num_threads() == before
