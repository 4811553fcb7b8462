"""Replica groups without processes: settings checks, and GroupOuterStep's rounds against a scripted quorum
(what the other groups send, which commits fail, when this group heals)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_commsgd.comm import Communicator
from lightning_commsgd.ft import (
    GroupOuterStep,
    Membership,
    QuorumUnavailableError,
    ReplicaGroupError,
    ReplicaGroupSettings,
    averaging_outer_optimizer,
    fingerprint_mismatch,
    require_torchft,
    start_lighthouse,
)


class ScriptedRounds:
    """Stands in for QuorumRounds: the other groups each add ``peer_value`` (weight 1) to every buffer; the
    script says which attempts fail, heal or find no quorum."""

    def __init__(self, peers: int = 1, peer_value: float = 1.0, script: list[str] | None = None) -> None:
        self.peers, self.peer_value = peers, peer_value
        # per attempt: "ok", "fail" (commit false), "heal", "heal+fail", "none"
        self.script = list(script or [])
        self.sent: list[torch.Tensor] = []
        self._outcome = "ok"
        self.heal_with: dict | None = None
        self.algorithm: GroupOuterStep | None = None

    def begin(self) -> Membership:
        self._outcome = self.script.pop(0) if self.script else "ok"
        if self._outcome == "none":
            raise QuorumUnavailableError("scripted: no quorum")
        healed = self._outcome.startswith("heal")
        if healed:
            assert self.algorithm is not None and self.heal_with is not None
            self.algorithm.load_group_state(self.heal_with)
        return Membership(1, self.peers + 1, 0, healed, True)

    def note_healed(self) -> None:
        pass

    def sum_(self, buffer: torch.Tensor, *, tag: str) -> torch.Tensor:
        self.sent.append(buffer.clone())
        if buffer.dtype == torch.float64:  # the fingerprint check: every peer has the same fingerprint
            buffer.mul_(self.peers + 1)
            return buffer
        buffer[:-1] += self.peers * self.peer_value
        buffer[-1] += self.peers
        return buffer

    def commit(self) -> bool:
        return not self._outcome.endswith("fail")

    def metrics(self) -> dict[str, float]:
        return {}


def _group(rounds: ScriptedRounds, **kwargs) -> tuple[GroupOuterStep, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs.setdefault("outer_optimizer", averaging_outer_optimizer)
    algorithm = GroupOuterStep(model, [optimizer], Communicator(), rounds, tau=1, **kwargs)  # type: ignore[arg-type]
    rounds.algorithm = algorithm
    return algorithm, model


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _move(model: nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_the_outer_step_averages_the_contributing_groups_pseudo_gradients():
    rounds = ScriptedRounds(peers=2, peer_value=0.3)  # each peer's pseudo-gradient: 0.3 everywhere
    algorithm, model = _group(rounds)
    start = _params(model)
    _move(model, -0.6)  # this group's pseudo-gradient: anchor - x = 0.6
    assert algorithm.after_optimizer_step()
    # lr-1 outer SGD: x = anchor - mean, mean = (0.6 + 0.3 + 0.3) / 3 = 0.4
    torch.testing.assert_close(_params(model), start - 0.4)
    assert algorithm.round_history == [(1, 3, True)]
    assert rounds.sent[0][-1] == 1.0  # this group's weight rode in the buffer


def test_a_group_that_heals_in_a_round_contributes_nothing_to_it_even_when_the_round_is_retried():
    rounds = ScriptedRounds(peers=1, peer_value=0.5, script=["heal+fail", "ok"])
    algorithm, model = _group(rounds)
    peer, peer_model = _group(ScriptedRounds())
    _move(peer_model, -1.0)
    peer.step = 7
    rounds.heal_with = peer.group_state()
    _move(model, -5.0)  # this group's own (stale) pseudo-gradient must not count
    algorithm.communicate("average")
    assert [float(b[-1]) for b in rounds.sent] == [0.0, 0.0]  # weight 0 in both attempts
    assert algorithm.step == 7 and algorithm.round_history == [(7, 1, False)]
    # the peer's anchor minus the peers' mean pseudo-gradient 0.5
    torch.testing.assert_close(_params(model), peer.anchors[0] - 0.5)


def test_a_failed_commit_leaves_the_state_and_the_round_runs_again():
    rounds = ScriptedRounds(peers=1, peer_value=0.0, script=["fail", "fail", "ok"])
    algorithm, model = _group(rounds)
    start = _params(model)
    _move(model, -0.2)
    algorithm.communicate("average")
    assert len(rounds.sent) == 3 and all(torch.equal(rounds.sent[0], b) for b in rounds.sent)
    torch.testing.assert_close(_params(model), start - 0.1)


def test_a_round_failing_every_attempt_stops_the_group():
    rounds = ScriptedRounds(script=["fail"] * 3)
    algorithm, _ = _group(rounds, round_attempts=3)
    with pytest.raises(ReplicaGroupError, match="failed 3 times in a row"):
        algorithm.communicate("average")


def test_without_a_quorum_the_group_trains_on_up_to_max_missed_rounds():
    rounds = ScriptedRounds(script=["none", "none", "none"])
    algorithm, model = _group(rounds, max_missed_rounds=2)
    _move(model, -0.5)
    before, anchor = _params(model), algorithm.anchors[0].clone()
    algorithm.after_optimizer_step()
    algorithm.after_optimizer_step()
    assert algorithm.missed_rounds == 2 and torch.equal(_params(model), before)
    assert torch.equal(algorithm.anchors[0], anchor)
    with pytest.raises(
        QuorumUnavailableError,
        match=r"stops at step 3: 3 rounds in a row without a quorum \(max_missed_rounds=2\); it trained on "
        r"locally since its last round at step 0\. scripted",
    ):
        algorithm.after_optimizer_step()


def test_state_a_group_heals_from_round_trips_with_counters_optimizers_and_extra_state():
    source, source_model = _group(ScriptedRounds())
    _move(source_model, -0.25)
    source.after_optimizer_step()
    source.register_extra_state("sampler", save=lambda: {"epoch": 3, "batch": 11}, load=lambda v: None)
    taken = {}
    target, target_model = _group(ScriptedRounds())
    target.register_extra_state("sampler", save=lambda: None, load=lambda v: taken.update(v))
    target.load_group_state(source.group_state())
    assert (target.step, target.rounds, target.last_round_step) == (1, 1, 1)
    assert torch.equal(_params(target_model), _params(source_model))
    assert torch.equal(target.anchors[0], source.anchors[0])
    assert taken == {"epoch": 3, "batch": 11}
    # the transfer is in both ledgers: at least the model and the anchor (fp32), counted the same each side
    numel = sum(p.numel() for p in source_model.parameters())
    sent = source.communicator.ledger.by_tag["ft_heal"].bytes_sent
    assert sent >= 2 * 4 * numel and target.communicator.ledger.by_tag["ft_heal"].bytes_received == sent
    with pytest.raises(ValueError, match="registered already"):
        target.register_extra_state("sampler", save=lambda: None, load=lambda v: None)


def test_a_peer_with_another_model_is_refused_naming_the_field():
    algorithm, _ = _group(ScriptedRounds())
    state = algorithm.group_state()
    state["fingerprint"] = dict(state["fingerprint"], model="weight:(5, 3)")
    with pytest.raises(ReplicaGroupError, match=r"configuration differs \(model: this group"):
        algorithm.load_group_state(state)
    assert fingerprint_mismatch({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["b", "c"]


def test_join_in_a_fresh_job_checks_the_fingerprints_and_changes_nothing():
    rounds = ScriptedRounds(peers=2)
    algorithm, model = _group(rounds)
    before = _params(model)
    membership = algorithm.join()
    assert not membership.healed and algorithm.step == 0 and torch.equal(_params(model), before)
    assert rounds.sent[0].dtype == torch.float64  # one small check, no outer step


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lighthouse": "localhost:29510", "group": 0}, "lighthouse"),
        ({"lighthouse": "http://h:1", "group": -1}, "group"),
        ({"lighthouse": "http://h:1", "group": 0, "min_groups": 0}, "min_groups"),
        ({"lighthouse": "http://h:1", "group": 0, "timeout": 0}, "timeout"),
        ({"lighthouse": "http://h:1", "group": 0, "quorum_timeout": float("nan")}, "quorum_timeout"),
        ({"lighthouse": "http://h:1", "group": True}, "group"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        ReplicaGroupSettings(**kwargs)


def test_bad_lighthouse_and_round_arguments_are_refused():
    with pytest.raises(ValueError, match="`min_groups`"):
        start_lighthouse(min_groups=0)
    with pytest.raises(ValueError, match="`heartbeat_timeout_ms`"):
        start_lighthouse(heartbeat_timeout_ms=0)
    with pytest.raises(ValueError, match="`round_attempts`"):
        _group(ScriptedRounds(), round_attempts=0)
    with pytest.raises(ValueError, match="`max_missed_rounds`"):
        _group(ScriptedRounds(), max_missed_rounds=-1)


def test_a_missing_torchft_says_how_to_install_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'lightning_commsgd\[ft\]'"):
        require_torchft("torchft_missing_for_this_test")


def test_commsgd_lighthouse_starts_prints_its_address_and_stops_on_sigterm():
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-m", "lightning_commsgd.cli", "lighthouse", "--port", "0"]
    command += ["--min-groups", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("lighthouse listening at http://") and "(min 2 groups)" in line, line
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "lighthouse stopped" in out
    bad = subprocess.run([*command[:-1], "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "`min_groups` must be an int >= 1" in bad.stderr


def test_the_advertised_host_name_is_checked():
    with pytest.raises(ValueError, match="`hostname`"):
        ReplicaGroupSettings(lighthouse="http://h:1", group=0, hostname="")
    assert ReplicaGroupSettings(lighthouse="http://h:1", group=0, hostname="10.0.0.2").hostname == "10.0.0.2"


def test_groups_whose_rounds_have_other_shapes_are_refused_naming_the_setting():
    """What sizes a round's buffer is in the fingerprint: a group that would all-reduce a buffer of another
    size (other fragments, presence slots, processes per group) is refused by name, not left to crash gloo."""
    rounds = ScriptedRounds()
    tracked, _ = _group(rounds, group=0, start_groups=3)
    untracked, _ = _group(ScriptedRounds())
    assert fingerprint_mismatch(tracked.fingerprint, untracked.fingerprint) == ["tracked_groups"]
    state = untracked.group_state()
    with pytest.raises(ReplicaGroupError, match=r"tracked_groups: this group 'of 3', the live groups 'none'"):
        tracked.load_group_state(state)
