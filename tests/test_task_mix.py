"""Task mixes (``--task compare+code``): every task an equal share of the calibration and training windows."""

import pytest
import torch

from rankdown.compress.calibration import calibration_windows
from rankdown.compress.config import CompressConfig
from rankdown.compress.training_data import data_windows
from rankdown.errors import RankdownError
from rankdown.tasks import Split, load_task, task_names


def test_a_mix_names_known_tasks_once():
    assert task_names("math") == ("math",) and task_names("compare+code") == ("compare", "code")
    for bad in ("nope", "math+nope", "math+", ""):
        with pytest.raises(RankdownError, match="unknown task"):
            task_names(bad)
    with pytest.raises(RankdownError, match="task mix 'math\\+math' names a task twice"):
        task_names("math+math")
    with pytest.raises(RankdownError, match="unknown task 'math\\+nope'"):
        CompressConfig(ratio=0.4, task="math+nope")


@pytest.mark.parametrize("split", [Split.CALIBRATION, Split.TRAIN])
def test_a_mix_interleaves_equal_shares_of_each_tasks_own_windows(tiny_tokenizer, split):
    cfg = CompressConfig(ratio=0.4, task="math+prose")
    mixed = data_windows(tiny_tokenizer, cfg, split, 32, 1024)
    alone = {name: calibration_windows(tiny_tokenizer, load_task(name, split).texts, 32, 512, name)
             for name in ("math", "prose")}
    assert mixed.shape == (32, 32)
    assert torch.equal(mixed[0::2], alone["math"]) and torch.equal(mixed[1::2], alone["prose"])
    # One task alone is that task's windows, as before mixes existed.
    single = data_windows(tiny_tokenizer, CompressConfig(ratio=0.4, task="math"), split, 32, 1024)
    assert torch.equal(single, calibration_windows(tiny_tokenizer, load_task("math", split).texts, 32, 1024, "math"))


def test_the_shortest_task_sets_every_tasks_share(tiny_tokenizer):
    """compare's calibration split is short: a mix never lets the longer task outweigh it."""
    cfg = CompressConfig(ratio=0.4, task="compare+code")
    mixed = data_windows(tiny_tokenizer, cfg, Split.CALIBRATION, 64, 10**7)
    short = calibration_windows(tiny_tokenizer, load_task("compare", Split.CALIBRATION).texts, 64, 10**7, "compare")
    assert mixed.shape[0] == 2 * short.shape[0] and torch.equal(mixed[0::2], short)
