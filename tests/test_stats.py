import math

import numpy as np
import pytest
import torch

from protonets.stats import mean_ci95


def test_mean_ci95_is_the_sample_interval_for_arrays_tensors_and_lists():
    acc = np.array([0.5, 0.75, 1.0, 0.25])
    mean, ci = mean_ci95(acc)
    assert mean == pytest.approx(0.625)
    assert ci == pytest.approx(1.96 * np.std(acc, ddof=1) / 2)
    assert mean_ci95(torch.tensor(acc)) == pytest.approx((mean, ci))
    assert mean_ci95(list(acc)) == pytest.approx((mean, ci))
    mean, ci = mean_ci95([0.9])
    assert mean == 0.9 and math.isnan(ci)  # one value: no interval, not a false 0
    with pytest.raises(ValueError, match="at least one"):
        mean_ci95([])


def test_ci_or_none_is_what_results_files_write():
    from protonets.stats import ci_or_none

    assert ci_or_none(mean_ci95([0.9])[1]) is None and ci_or_none(0.25) == 0.25
