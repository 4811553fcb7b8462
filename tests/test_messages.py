"""Error messages a user reads first (issue 18): each names the argument, what it means and the allowed range,
and blames the class the user built."""

from __future__ import annotations

import re

import pytest
import torch

import lightning_commsgd as lc
from lightning_commsgd.algorithms import PeriodicAverager
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression import QSGD, BlockInt8, PNormQuantizer, ScaledSign, TopK
from lightning_commsgd.schedules import AdaComm, ConstantPeriod, IncreasingPeriod, PostLocalSGD
from lightning_commsgd.strategies import ProcessGroupStrategy
from lightning_commsgd.topology import make_topology


def _averager(**kwargs):
    net = torch.nn.Linear(2, 1)
    return PeriodicAverager(net, [torch.optim.SGD(net.parameters(), lr=0.1)], Communicator(), **kwargs)


@pytest.mark.parametrize(
    ("build", "error", "expected"),
    [
        (lambda: lc.LocalSGDStrategy(global_every=2, group_size=0), ValueError,
         "Arg `group_size` must be an int >= 1 (ranks per averaging block, consecutive global ranks), "
         "got 0."),
        (lambda: _averager(global_every=2, group_size=0), ValueError,
         "Arg `group_size` must be an int >= 1 (ranks per averaging block, consecutive global ranks), "
         "got 0."),
        (lambda: lc.LocalSGDStrategy(global_every=0), ValueError,
         "Arg `global_every` must be an int >= 1 (every how many rounds one averages over all ranks"),
        (lambda: _averager(global_every=1.5), TypeError, "Arg `global_every` must be an int >= 1 (every how"),
        (lambda: lc.LocalSGDStrategy(tau=0), ValueError,
         "Arg `tau` must be an int >= 1 (the communication period: optimizer steps between rounds), got 0."),
        (lambda: _averager(tau=0), ValueError, "Arg `tau` must be an int >= 1 (the communication period: "),
        (lambda: ConstantPeriod(0), ValueError, "Arg `tau` must be an int >= 1 (the communication period: "),
        (lambda: PostLocalSGD(switch_step=-1, tau=2), ValueError,
         "Arg `switch_step` must be an int >= 0 (optimizer steps before local SGD starts), got -1."),
        (lambda: IncreasingPeriod(tau0=1, every_rounds=2, factor=1), ValueError,
         "Arg `factor` must be an int >= 2 (the growth factor of the period), got 1."),
        (lambda: IncreasingPeriod(tau0=1, every_rounds=0), ValueError,
         "Arg `every_rounds` must be an int >= 1 (rounds at one period before it grows; or None), got 0."),
        (lambda: AdaComm(interval_steps=5, min_tau=0), ValueError,
         "Arg `min_tau` must be an int >= 1 (the smallest communication period), got 0."),
        (lambda: AdaComm(interval_steps=0), ValueError,
         "Arg `interval_steps` must be an int >= 1 (optimizer steps per AdaComm interval T_0; or None), "
         "got 0."),
        (lambda: ScaledSign(block_size=0), ValueError,
         "Arg `block_size` must be an int >= 1 (values sharing one scale, or None for one block), got 0."),
        (lambda: BlockInt8(block_size=0), ValueError,
         "Arg `block_size` must be an int >= 1 (values per block sharing one scale), got 0."),
        (lambda: PNormQuantizer(block_size=0), ValueError,
         "Arg `block_size` must be an int >= 1 (values per block sharing one norm), got 0."),
        (lambda: QSGD(levels=0), ValueError,
         "Arg `levels` must be an int >= 1 (s, quantization levels per sign; at most 127), got 0."),
        (lambda: QSGD(bucket_size=0), ValueError,
         "Arg `bucket_size` must be an int >= 1 (values per bucket sharing a norm), got 0."),
        (lambda: make_topology("ring", 0), ValueError,
         "Arg `world_size` must be an int >= 1 (the number of nodes m, one per rank), got 0."),
    ],
)
def test_period_and_size_validators_name_the_argument_its_meaning_and_range(build, error, expected):
    with pytest.raises(error) as info:
        build()
    assert str(info.value).startswith(expected)
    if "`group_size`" in expected or "`global_every`" in expected:  # sizes and counts are not "the period"
        assert "communication period" not in str(info.value)


def _build(cls, **kwargs):
    required = {
        "CompressedSGDStrategy": {"compressor": TopK(0.1)},
        "DoubleResidualStrategy": {"compressor": QSGD()},
        "DianaStrategy": {"compressor": QSGD()},
        "ParameterServerStrategy": {"k": 1, "mode": "sync"},
    }
    return cls(**required.get(cls.__name__, {}), **kwargs)


# every strategy the package exports: the named ones (CommunicationStrategy's) and the parameter-server
# family (their sibling on the process base)
STRATEGIES = sorted(
    (c for c in vars(lc).values() if isinstance(c, type) and issubclass(c, ProcessGroupStrategy)
     and c not in (lc.CommunicationStrategy, ProcessGroupStrategy)),
    key=lambda c: c.__name__,
)


def test_every_strategy_is_covered():
    assert {c.__name__ for c in STRATEGIES} >= {
        "LocalSGDStrategy", "OverlapLocalSGDStrategy", "DecentralizedSGDStrategy", "ElasticAveragingStrategy",
        "CompressedSGDStrategy", "DoubleResidualStrategy", "DianaStrategy", "ParameterServerStrategy",
        "KSyncSGDStrategy", "AsyncSGDStrategy",
    }


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
def test_a_misspelt_argument_blames_the_strategy_and_suggests_the_name(cls):
    with pytest.raises(TypeError) as info:
        _build(cls, sync_timout=5.0)
    expected = f"{cls.__name__} got an unexpected argument 'sync_timout'; did you mean 'sync_timeout'?"
    assert str(info.value) == expected
    assert "__init__" not in str(info.value)


def test_local_sgd_typo_of_its_own_argument():
    expected = "LocalSGDStrategy got an unexpected argument 'tua'; did you mean 'tau'?"
    with pytest.raises(TypeError, match=f"^{re.escape(expected)}$"):
        lc.LocalSGDStrategy(tua=8)
    expected = "DecentralizedSGDStrategy got an unexpected argument 'topolgy'; did you mean 'topology'?"
    with pytest.raises(TypeError, match=f"^{re.escape(expected)}$"):
        lc.DecentralizedSGDStrategy(topolgy="ring")


def test_unknown_arguments_without_a_close_name_list_what_is_accepted():
    with pytest.raises(TypeError) as info:
        lc.LocalSGDStrategy(tua=8, xyzzy=1)
    message = str(info.value)
    assert message.startswith(
        "LocalSGDStrategy got unexpected arguments 'tua' (did you mean 'tau'?), 'xyzzy'; it accepts: "
    )
    assert "it accepts: " in message and " tau," in message and " sync_timeout," in message
