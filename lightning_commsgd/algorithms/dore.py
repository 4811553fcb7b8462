"""DORE: double residual compression (Liu, Li, Tang, Yan, AISTATS 2020), and DIANA as its special case.

Per optimizer step k, in the paper's symbols (n workers, Q the compressor, Q_m the model compressor):

    worker i:  Delta_i = g_i - h_i;  Delta_hat_i = Q(Delta_i);  send Delta_hat_i
               h_i <- h_i + alpha Delta_hat_i
    master:    Delta_hat = (1/n) sum_i Delta_hat_i;  g_hat = h + Delta_hat;  h <- h + alpha Delta_hat
               x_{k+1} = the user's optimizer step from x_hat_k with gradient g_hat
               q = x_{k+1} - x_hat_k + eta e;  q_hat = Q_m(q);  e <- q - q_hat;  x_hat <- x_hat + beta q_hat
               send q_hat
    worker i:  x_hat_i <- x_hat_i + beta q_hat        (the model every rank computes gradients on)

h = h_i = 0 and x_hat_i = x_hat_0 at the start.

Rates (``rates``, one switch; an explicit ``alpha`` / ``beta`` wins over it):

- ``"paper"`` (default): the paper's experimental rates alpha = 0.1, beta = 1 (with eta = 1). x_hat takes
  the whole compressed step (measured on the digits benchmark: DDP's loss step for step at 6.6% of its
  bytes). beta = 1 lies outside the convergence theorems (beta <= 1/(C_m+1)); this mode does not warn.
- ``"theory"``: the theorems' alpha = 1/(2(C+1)), beta = 1/(C_m+1) from the compressors' variance constants
  (unbiased compressors only). x_hat moves by beta of each step (0.118 for inf-norm blocks of 256): the
  run matches DDP with the learning rate times beta, i.e. trains slowly. Explicit rates above the
  theorems' bounds warn.

The user's optimizer stands where the paper has
``prox_{gamma R}(x_hat - gamma g_hat)``: with plain SGD (lr = gamma, no momentum, no weight decay) it is
the paper's update with R = 0; momentum and weight decay (the gradient of R = (wd/2)||x||^2, not its prox)
act on g_hat there, and the learning-rate schedule sets gamma.

Deployments (``server``):

- ``"rank0"`` (the paper's topology): rank 0 is also the master. Compressed Delta_hat_i are gathered to
  rank 0 (each other rank sends one payload), rank 0 runs the master step and the optimizer, and
  broadcasts the compressed q_hat (one payload). Two collectives per step; the optimizer state lives on
  rank 0 only.
- ``"replicated"``: Delta_hat_i are all-gathered and every rank runs the master step with the same
  master random stream, so every rank computes the identical q_hat without sending it (one collective
  per step; the model side then saves no bytes but keeps the algorithm's trajectory).

DIANA (Mishchenko et al. 2019): gradient residuals with an uncompressed model, i.e. DORE with
``model_compressor=Identity()``, beta = 1, eta = 0 (then x_hat = x exactly); see :func:`diana`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_commsgd.algorithms.base import check_choice
from lightning_commsgd.algorithms.compressed import CompressedAlgorithm, check_compressor
from lightning_commsgd.algorithms.protocol import AlgorithmConfig, World
from lightning_commsgd.comm import Communicator
from lightning_commsgd.compression.base import Compressor, Identity
from lightning_commsgd.compression.wire import WireFormat, WireName, as_wire_format

__all__ = [
    "PAPER_RATES",
    "RATES",
    "DIANA",
    "DORE",
    "SERVER_MODES",
    "DoubleResidualCompression",
    "default_dore_rates",
    "resolve_dore_rates",
    "validate_dore_rates",
]

SERVER_MODES: tuple[str, ...] = ("rank0", "replicated")
ServerMode = Literal["rank0", "replicated"]
RATES: tuple[str, ...] = ("paper", "theory")
Rates = Literal["paper", "theory"]
PAPER_RATES: tuple[float, float] = (0.1, 1.0)  # (alpha, beta) of the paper's experiments, with eta = 1


def default_dore_rates(
    compressor: Compressor, model_compressor: Compressor, numel: int, rates: Rates = "paper"
) -> tuple[float, float]:
    """DORE's default (alpha, beta): :data:`PAPER_RATES` for ``rates="paper"``; for ``rates="theory"``
    alpha = 1/(2(C+1)) (C of the gradient compressor) and beta = 1/(C_m+1) (C_m of the model compressor),
    C from :meth:`Compressor.variance_bound` over ``numel`` values (unbiased compressors only)."""
    if rates not in RATES:
        raise ValueError(f"Arg `rates` must be one of {RATES}, got {rates!r}.")
    if rates == "paper":
        return PAPER_RATES
    c_grad, c_model = compressor.variance_bound(numel), model_compressor.variance_bound(numel)
    missing = [n for n, c in (("compressor", c_grad), ("model_compressor", c_model)) if c is None]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} is biased (no variance constant C), so DORE's theory rates are undefined: "
            "pass `alpha` and `beta` explicitly, or use rates='paper' (DORE's theory assumes unbiased "
            "compressors)."
        )
    assert c_grad is not None and c_model is not None
    return 1 / (2 * (c_grad + 1)), 1 / (c_model + 1)


def resolve_dore_rates(
    compressor: Compressor,
    model_compressor: Compressor,
    numel: int,
    alpha: Any,
    beta: Any,
    eta: Any,
    rates: Rates = "paper",
    names: tuple[str, str, str] = ("alpha", "beta", "eta"),
    *,
    stacklevel: int = 3,
) -> tuple[float, float, float]:
    """(alpha, beta, eta) in force: explicit values win, ``None`` takes :func:`default_dore_rates`; all
    checked by :func:`validate_dore_rates`, against the theorems' bounds only for ``rates="theory"``
    (``stacklevel`` as there, counted from the caller of this function)."""
    if rates not in RATES:
        raise ValueError(f"Arg `rates` must be one of {RATES}, got {rates!r}.")
    c_grad = c_model = None
    default_alpha, default_beta = PAPER_RATES
    if rates == "theory":
        c_grad, c_model = compressor.variance_bound(numel), model_compressor.variance_bound(numel)
        if (alpha is None and c_grad is None) or (beta is None and c_model is None):
            default_dore_rates(compressor, model_compressor, numel, rates)  # raises, naming the biased one
        default_alpha = 1 / (2 * (c_grad + 1)) if c_grad is not None else math.nan  # nan: alpha is given
        default_beta = 1 / (c_model + 1) if c_model is not None else math.nan
    alpha = default_alpha if alpha is None else alpha
    beta = default_beta if beta is None else beta
    return validate_dore_rates(alpha, beta, eta, c_grad, c_model, names, stacklevel=stacklevel + 1)


def validate_dore_rates(
    alpha: Any,
    beta: Any,
    eta: Any,
    c_grad: float | None,
    c_model: float | None,
    names: tuple[str, str, str] = ("alpha", "beta", "eta"),
    *,
    stacklevel: int = 3,
) -> tuple[float, float, float]:
    """Errors for values no theory allows, warnings for values outside the convergence theorems.

    alpha (h's step) must lie in [0, 1]: 0 never updates h (QSGD-like), the theorems take
    alpha <= 1/(C+1). beta in (0, 1]: the theorems take beta <= 1/(C_m+1). eta >= 0 (0 drops the error
    compensation); the strongly convex theorem needs eta small, the paper's experiments use eta = 1.
    ``c_grad`` / ``c_model`` ``None`` skip the warnings (a biased compressor, or ``rates="paper"``).
    """
    a_name, b_name, e_name = names
    for name, value in zip(names, (alpha, beta, eta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Arg `{name}` must be a finite number, got {value!r}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"Arg `{a_name}` (alpha, h_i's step) must lie in [0, 1], got {alpha}.")
    if not 0 < beta <= 1:
        raise ValueError(f"Arg `{b_name}` (beta, x_hat's step) must lie in (0, 1], got {beta}.")
    if eta < 0:
        raise ValueError(f"Arg `{e_name}` (eta, error-compensation weight) must be >= 0, got {eta}.")
    if c_grad is not None and alpha > 1 / (c_grad + 1) + 1e-12:
        warnings.warn(
            f"{a_name}={alpha} (alpha) exceeds 1/(C+1)={1 / (c_grad + 1):.4g}, outside DORE's convergence "
            "theory.",
            stacklevel=stacklevel,
        )
    if c_model is not None and beta > 1 / (c_model + 1) + 1e-12:
        warnings.warn(
            f"{b_name}={beta} (beta) exceeds 1/(C_m+1)={1 / (c_model + 1):.4g}, outside DORE's convergence "
            "theory.",
            stacklevel=stacklevel,
        )
    return float(alpha), float(beta), float(eta)


class DoubleResidualCompression(CompressedAlgorithm):
    """DORE on one rank (see the module docstring for the algorithm and the call order).

    Args:
        optimizers: the one optimizer (the master's update rule).
        communicator: carries and counts every payload (tags ``"dore_gradient"``, ``"dore_model"``).
        compressor: Q for the gradient residuals Delta_i (DORE's worker side).
        model_compressor: Q_m for the model residual q (master side); default: the same as ``compressor``.
        server: ``"rank0"`` or ``"replicated"``.
        alpha: h's step alpha; ``None``: from ``rates`` (0.1, or 1/(2(C+1)) for ``"theory"``).
        beta: x_hat's step beta; ``None``: from ``rates`` (1, or 1/(C_m+1) for ``"theory"``).
        eta: weight eta of the compression error e fed back into q; default 1 (the paper's experiments).
        rates: where unset alpha / beta come from: ``"paper"`` (default; the paper's experiments, fast)
            or ``"theory"`` (the convergence theorems; x_hat moves by beta < 1 of each step, slow). See
            the module docstring.
        seed: base of the random streams (see :class:`CompressedAlgorithm`).
        wire: ``"packed"`` or ``"entropy"`` (see :class:`CompressedAlgorithm`).
    """

    def __init__(
        self,
        optimizers: Sequence[Optimizer],
        communicator: Communicator,
        compressor: Compressor,
        *,
        model_compressor: Compressor | None = None,
        server: ServerMode = "rank0",
        alpha: float | None = None,
        beta: float | None = None,
        eta: float = 1.0,
        rates: Rates = "paper",
        seed: int = 0,
        buffers: Sequence[Tensor] = (),
        wire: WireFormat | str = "packed",
    ) -> None:
        super().__init__(optimizers, communicator, seed, buffers=buffers, wire=wire)
        self.compressor = check_compressor(compressor)
        self.model_compressor = check_compressor(
            compressor if model_compressor is None else model_compressor, "model_compressor"
        )
        if server not in SERVER_MODES:
            raise ValueError(f"Arg `server` must be one of {SERVER_MODES}, got {server!r}.")
        self.server = server
        self.rates = rates
        self.alpha, self.beta, self.eta = resolve_dore_rates(
            self.compressor, self.model_compressor, self.numel, alpha, beta, eta, rates
        )
        zeros = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        self.h_local: Tensor | None = zeros.clone()  # h_i
        # x_hat_0 is the model at the first step (after any checkpoint restore), taken then
        self.x_hat: Tensor | None = None
        is_master = self.steps_optimizer
        self.h_master: Tensor | None = zeros.clone() if is_master else None  # h
        self.error: Tensor | None = zeros.clone() if is_master else None  # e
        self._pending_delta: Tensor | None = None  # Delta_hat_i, applied to h_i once the step is known good
        self._bad_gradient_ranks: list[int] = []

    round_tags = ("dore_gradient", "dore_model", "final")

    @property
    def steps_optimizer(self) -> bool:
        return self.server == "replicated" or self.rank == 0

    @property
    def should_step(self) -> bool:
        # rank 0 in rank0 mode learns of a non-finite gradient before its step: it skips the step (nothing
        # is poisoned) and reports it to the workers with q_hat, then every rank raises
        return self.steps_optimizer and not self._bad_gradient_ranks

    def _tensors(self) -> dict[str, Tensor | None]:
        return {"h_local": self.h_local, "x_hat": self.x_hat, "h_master": self.h_master, "error": self.error}

    # -- worker side, then the master's aggregation -----------------------------------------------------
    def after_backward(self) -> None:
        """Compress and exchange Delta_i; on the stepping rank(s) p.grad <- g_hat and h advances."""
        assert self.h_local is not None
        if self.x_hat is None:
            self.x_hat = self.flat_params()
        grad = self.flat_grads(out=self.step_buffer("grad"))  # the steps below reuse it in place
        finite = self.is_finite(grad)
        delta = grad.sub_(self.h_local) if finite else grad.zero_()
        payload = self.compressor.encode(delta, self.worker_generator)
        message = self.with_status(self.to_wire(payload, self.compressor), finite)
        if self.server == "replicated":
            messages: list[Tensor] | None = self.all_gather_messages(message, tag="dore_gradient")
        else:
            messages = self.gather_messages(message, tag="dore_gradient")
        # Delta_hat_i, decoded once the message has left: a worker decodes it while the master works
        self._pending_delta = self.compressor.decode_into(payload, self.numel, self.step_buffer("own_delta"))
        self._bad_gradient_ranks = []
        if messages is None:  # a worker in rank0 mode: the master's verdict comes with q_hat
            return
        payloads, bad = [], []
        for r, m in enumerate(messages):
            body, ok = self.split_status(m)
            payloads.append(body)
            if not ok:
                bad.append(r)
        self._bad_gradient_ranks = bad
        if bad:
            if self.server == "replicated":
                self.raise_non_finite("gradient", bad)
            return  # rank 0: report it to the workers in the model phase, then raise
        mean_delta = self.step_buffer("master").zero_()
        for r, body in enumerate(payloads):  # rank order: every replicated master sums identically
            if r == self.rank and self._pending_delta is not None:  # its own payload, decoded already
                mean_delta += self._pending_delta
            else:
                payload = self.from_wire(body, self.compressor)
                mean_delta += self.compressor.decode_into(payload, self.numel, self.step_buffer("peer_delta"))
        mean_delta /= self.world_size
        assert self.h_master is not None and self.x_hat is not None
        self.set_grads(torch.add(self.h_master, mean_delta, out=grad))  # g_hat (grad's buffer is free)
        self.h_master += mean_delta.mul_(self.alpha)
        self.set_params(self.x_hat)  # the optimizer steps from x_hat_k

    # -- the master's model residual, then every rank's x_hat -----------------------------------------------
    def after_optimizer_step(self) -> bool:
        """q, q_hat, e and x_hat on the master; q_hat to the workers (rank0 mode); parameters <- x_hat."""
        assert self.x_hat is not None and self.h_local is not None
        # the master's model payload: decoded (q_hat, e) only once the workers have it, so that they do not
        # wait for the decode; e stays untouched until the broadcast said every rank is finite
        own_payload: Tensor | None = None
        q: Tensor | None = None
        if self.steps_optimizer:
            bad = list(self._bad_gradient_ranks)
            if not bad:
                assert self.error is not None
                # q = x_{k+1} - x_hat + eta e, in place on a fresh vector (e untouched until q is finite)
                # (the buffer that held the mean Delta_hat in after_backward: used up there)
                eta_e = torch.mul(self.error, self.eta, out=self.step_buffer("master"))
                q = self.flat_params(out=self.step_buffer("q")).sub_(self.x_hat).add_(eta_e)
                if self.is_finite(q):
                    payload = own_payload = self.model_compressor.encode(q, self.master_generator)
                else:
                    payload = torch.zeros(self.model_compressor.payload_nbytes(self.numel), dtype=torch.uint8)
                    bad = [-1]  # the master's own model residual
            else:
                payload = torch.zeros(self.model_compressor.payload_nbytes(self.numel), dtype=torch.uint8)
            status = self._status_byte(bad)
            body = self.to_wire(payload, self.model_compressor) if not bad else payload
            message: Tensor | None = torch.cat([body.to(self.device), status])
        else:
            message = None
        if self.server == "rank0":
            size = self.model_compressor.payload_nbytes(self.numel) + 1 + self.world_size
            message = self.broadcast_message(message, size, tag="dore_model")
            body, verdict = message[: -1 - self.world_size], message[-1 - self.world_size :]
            bad = self._decode_status(verdict)
            if bad:
                what = "model residual" if -1 in bad else "gradient"
                self.raise_non_finite(what, [0] if -1 in bad else bad)
            if own_payload is None:  # a worker
                own_payload = self.from_wire(body, self.model_compressor)
        elif own_payload is None:  # replicated: the master residual was not finite, identically everywhere
            self.raise_non_finite("model residual", list(range(self.world_size)))
        assert own_payload is not None and self._pending_delta is not None
        q_hat = self.model_compressor.decode_into(own_payload, self.numel, self.step_buffer("q_hat"))
        if q is not None:  # a master: e = q - q_hat
            assert self.error is not None
            torch.sub(q, q_hat, out=self.error)
        self.x_hat += q_hat.mul_(self.beta)  # q_hat and Delta_hat_i are fresh and used up here
        self.h_local += self._pending_delta.mul_(self.alpha)
        self._pending_delta = None
        self.set_params(self.x_hat)
        return super().after_optimizer_step()

    def _status_byte(self, bad: list[int]) -> Tensor:
        """One byte per rank (1 = its gradient was non-finite) and a last byte (1 = the master's q was)."""
        status = torch.zeros(self.world_size + 1, dtype=torch.uint8, device=self.device)
        for r in bad:
            status[r if r >= 0 else self.world_size] = 1
        return status

    def _decode_status(self, status: Tensor) -> list[int]:
        flags = status.tolist()
        bad = [r for r in range(self.world_size) if flags[r]]
        return [-1] if flags[self.world_size] else bad


_LARGE = 1 << 30  # a tensor size larger than any block: the compressor's constant C for a full block


class DORE(AlgorithmConfig):
    """DORE (Liu, Li, Tang, Yan, AISTATS 2020): compressed gradient residuals up, compressed model residuals
    with error compensation down (see :class:`DoubleResidualCompression`). The user's optimizer is the
    master's update: x_{k+1} = optimizer step from x_hat_k with gradient g_hat.

    Args:
        compressor: Q for the workers' gradient residuals Delta_i, a compressor (e.g.
            ``PNormQuantizer(p=inf, 256)``) or a codec name (``"int8"``, ``"int4"``, ``"bf16"``,
            ``"fp16"``; see :mod:`lightning_commsgd.compression.names`).
        model_compressor: Q_m for the master's model residual q (a compressor or codec name); default: the
            same as ``compressor``.
        master: where the master update runs: ``"rank0"`` (default, the paper's topology: a gather up and a
            broadcast down each step; rank 0 holds the optimizer state) or ``"replicated"`` (an all-gather
            each step; every rank runs the master step with a shared random stream; nothing is sent down).
        shift_rate: alpha, h's step, in [0, 1]; ``None`` (default): from ``rates``.
        model_rate: beta, x_hat's step, in (0, 1]; ``None`` (default): from ``rates``.
        error_weight: eta, weight of the fed-back compression error e; default 1.0 (the paper). >= 0.
        rates: the switch for unset shift_rate / model_rate: ``"paper"`` (default: alpha = 0.1, beta = 1,
            the paper's experiments) or ``"theory"`` (the theorems' 1/(2(C+1)), 1/(C_m+1); unbiased
            compressors only).
        seed: base of the compressors' random streams (rank r: seed + 1 + r; master: seed).
        wire: how the payloads travel: ``"packed"`` (default: the compressors' fixed-size payloads) or
            ``"entropy"`` (entropy-coded with Zstandard: the inf-norm ternary codes at about 1.26 instead of
            2.13 bits per value; the same trajectory bit for bit). See
            :mod:`lightning_commsgd.compression.wire`.
    """

    name = "dore"
    supports_loss_scaling = False

    def __init__(
        self,
        compressor: Compressor | str,
        model_compressor: Compressor | str | None = None,
        master: ServerMode = "rank0",
        shift_rate: float | None = None,
        model_rate: float | None = None,
        error_weight: float = 1.0,
        rates: Rates = "paper",
        seed: int = 0,
        wire: WireName | WireFormat = "packed",
    ) -> None:
        self.compressor = check_compressor(compressor)
        self.wire = as_wire_format(wire)
        self.model_compressor = check_compressor(
            compressor if model_compressor is None else model_compressor, "model_compressor"
        )
        self.master = check_choice(master, "master", SERVER_MODES)
        self.rates = check_choice(rates, "rates", RATES)
        names = ("shift_rate", "model_rate", "error_weight")
        # checked now, before any process starts (the theory's rates are computed for the model's size)
        resolve_dore_rates(
            self.compressor, self.model_compressor, _LARGE, shift_rate, model_rate, error_weight, rates, names
        )
        self.shift_rate, self.model_rate, self.error_weight = shift_rate, model_rate, error_weight
        self.seed = int(seed)

    def build(
        self, module: nn.Module, optimizers: Sequence[Optimizer], communicator: Communicator, world: World
    ) -> DoubleResidualCompression:
        return DoubleResidualCompression(
            optimizers,
            communicator,
            self.compressor,
            model_compressor=self.model_compressor,
            server=self.master,  # type: ignore[arg-type]
            alpha=self.shift_rate,
            beta=self.model_rate,
            eta=self.error_weight,
            rates=self.rates,  # type: ignore[arg-type]
            seed=self.seed,
            buffers=list(module.buffers()),
            wire=self.wire,
        )


class DIANA(DORE):
    """DIANA (Mishchenko, Gorbunov, Takac, Richtarik 2019): compressed gradient residuals with learned shifts
    h_i, and an uncompressed model: DORE with ``model_compressor=Identity()``, beta = 1, eta = 0.

    Args:
        compressor: Q for the gradient residuals, a compressor (e.g. ``PNormQuantizer(p=inf, 256)``) or a
            codec name (``"int8"``, ``"int4"``).
        master: ``"rank0"`` (default: the master broadcasts the fp32 model change each step) or
            ``"replicated"``.
        shift_rate: alpha, h's step; default 1/(2(C+1)), DIANA's theory. Above 1/(C+1) warns.
        seed: as for :class:`DORE`.
        wire: as for :class:`DORE`.
    """

    name = "diana"

    def __init__(
        self,
        compressor: Compressor | str,
        master: ServerMode = "rank0",
        shift_rate: float | None = None,
        seed: int = 0,
        wire: WireName | WireFormat = "packed",
    ) -> None:
        super().__init__(
            compressor,
            Identity(),
            master=master,
            shift_rate=shift_rate,
            model_rate=1.0,
            error_weight=0.0,
            rates="theory",
            seed=seed,
            wire=wire,
        )
