"""CRD's memory banks, sharded across ranks, its negative draws and its NCE loss.

The banks hold one L2-normalised embedding per training sample: one of the student's, one
of the teacher's (``N x D`` floats each; ImageNet: 1.28M x 128 = 656 MB per bank). Rank
``r`` of ``R`` keeps the rows ``i`` with ``i % R == r`` (row ``i // R`` of its shard), so a
rank holds ``2 * ceil(N / R) * D * 4`` bytes (:meth:`ContrastMemory.bytes_per_rank`).

One step, on every rank (``b`` images per rank, ``B = R b`` in all, ``K`` negatives):
1. the batch's embeddings, dataset indices and labels are all-gathered (``B x D``: small;
   the gather passes gradients back to the rank that made each embedding);
2. every rank draws the same ``B x K`` negatives: negative ``k`` of the sample with
   dataset index ``i`` at draw ``d`` is a hash of ``(seed, d, i, k)``, so the draw depends
   on neither the rank count nor the batch's order (:func:`draw_negatives`); column 0 is
   the positive, the sample's own row;
3. each rank scores only the (sample, row) pairs whose row it holds, and sums their NCE
   terms (the loss has no normaliser across negatives: the constant ``Z`` is fixed once),
   divided by its own ``b``: DDP's average of the ranks' gradients is then exactly the
   gradient of the one-process loss over ``B`` images, and the ranks' mean logged value is
   that loss;
4. each rank updates the rows it holds of the ``B`` samples (momentum, then L2 norm).
Nothing but the ``B x D`` embeddings crosses the network; the rows never move.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from kdscale.errors import KdscaleError
from kdscale.log import log
from kdscale.parallel.collectives import gather_rows, world

EPS = 1e-7  # RepDistiller crd/criterion.py
_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MUL1, _MUL2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplications wrap modulo 2^64)."""
    x = (x ^ _shift_right(x, 30)) * _MUL1
    x = (x ^ _shift_right(x, 27)) * _MUL2
    return x ^ _shift_right(x, 31)


def uniform_integers(seed: int, draw: int, indices: torch.Tensor, count: int, bounds: torch.Tensor,
                     stream: int = 0) -> torch.Tensor:
    """``(len(indices), count)`` integers, row ``b`` uniform in ``[0, bounds[b])``, each a pure
    function of ``(seed, stream, draw, indices[b], column)``."""
    base = _mix(torch.tensor(_signed(seed * 0x100000001B3 + draw * _GOLDEN + stream * _MUL2), dtype=torch.long))
    per_sample = _mix(base.to(indices.device) ^ indices.long())
    columns = torch.arange(1, count + 1, device=indices.device, dtype=torch.long) * _GOLDEN
    bits = _shift_right(_mix(per_sample[:, None] + columns[None, :]), 11)  # 53 random bits
    return (bits.double() * 2.0 ** -53 * bounds.double()[:, None]).long()


class ContrastSampler:
    """Draws CRD's contrast indices. Negatives: ``other_class`` (RepDistiller's ``--mode exact``:
    uniform over the samples of the other classes) or ``uniform`` (over every sample, as
    ``ContrastMemory`` draws when no indices are given), with replacement; see
    :mod:`kdscale.methods.crd`. Positives (:meth:`positives`): the sample itself (``exact``) or
    a sample of its class drawn uniformly, itself included (``--mode relax``)."""

    def __init__(self, labels: torch.Tensor, mode: str, seed: int):
        self.mode, self.seed, self.size = mode, seed, len(labels)
        classes = labels.long() + 1  # -1 (a sample without a readable label) is a class of its own
        self.labels = labels.long()
        self.order = torch.argsort(classes, stable=True)
        counts = torch.bincount(classes)
        self.class_count = counts
        self.class_start = torch.cumsum(counts, 0) - counts
        self._on_device: dict[str, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(labels, order, class counts, class starts) on ``device``, copied there once."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = tuple(t.to(device) for t in (self.labels, self.order, self.class_count,
                                                                 self.class_start))
        return self._on_device[key]

    def __call__(self, draw: int, indices: torch.Tensor, count: int) -> torch.Tensor:
        device = indices.device
        if self.mode == "uniform":
            bounds = torch.full((len(indices),), self.size, device=device)
            return uniform_integers(self.seed, draw, indices, count, bounds)
        labels, order, class_count, class_start = self._tables(device)
        classes = labels[indices] + 1
        n_class, start = class_count[classes], class_start[classes]
        u = uniform_integers(self.seed, draw, indices, count, self.size - n_class)
        position = u + n_class[:, None] * (u >= start[:, None])  # skip the anchor's class block
        return order[position]

    def positives(self, draw: int, indices: torch.Tensor, mode: str) -> torch.Tensor:
        """Column 0 of the contrast indices: ``indices`` (``exact``) or a same-class sample (``relax``)."""
        if mode == "exact":
            return indices
        labels, order, class_count, class_start = self._tables(indices.device)
        classes = labels[indices] + 1
        u = uniform_integers(self.seed, draw, indices, 1, class_count[classes], stream=1)[:, 0]
        return order[class_start[classes] + u]


SAMPLES_PER_DRAW = 64
"""Samples whose contrast indices are drawn at a time (64 x 16384 indices)."""
PAIRS_PER_CHUNK = 1 << 15
"""Scored pairs per chunk: the bank rows of one chunk (32768 x D floats) are all that is
gathered at a time, and nothing per pair is kept for the backward."""


class HeldPairsNCE(torch.autograd.Function):
    """The sum of CRD's NCE terms (RepDistiller ``ContrastLoss``) over the scored pairs, with
    ``s = <bank row, anchor>``, ``log P = s / T - log Z`` and ``c = K / N + eps``: a positive
    adds ``-log(P / (P + c))``, a negative ``-log((K / N) / (P + c))``.

    Computed in chunks of pairs, from ``log P`` (no ``exp`` overflow, no ``log 0`` at small
    temperatures); the gradient with respect to the anchors, ``sum (P / (P + c) - [positive]) /
    T * row``, is accumulated in the same pass, so the backward keeps one ``B x D`` tensor
    instead of every gathered row (RepDistiller's ``bmm`` keeps ``B (K + 1) D`` floats)."""

    @staticmethod
    def forward(ctx, anchors, bank, sample, row, positive, z: float, temperature: float, negatives: int,
                dataset_size: int):
        noise = negatives / dataset_size
        log_c, log_noise, log_z = math.log(noise + EPS), math.log(noise), math.log(z)
        total = torch.zeros((), dtype=torch.float64, device=anchors.device)
        grad = torch.zeros_like(anchors)
        for start in range(0, len(sample), PAIRS_PER_CHUNK):
            part = slice(start, start + PAIRS_PER_CHUNK)
            rows, samples, is_positive = bank[row[part]], sample[part], positive[part]
            log_p = (rows * anchors[samples]).sum(dim=1) / temperature - log_z
            log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, log_c))
            total -= (torch.where(is_positive, log_p, log_noise) - log_denominator).double().sum()
            slope = (torch.exp(log_p - log_denominator) - is_positive.to(log_p.dtype)) / temperature
            grad.index_add_(0, samples, slope[:, None] * rows)
        ctx.save_for_backward(grad)
        return total.to(anchors.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad_output * grad,) + (None,) * 8


def exp_score_sum(anchors: torch.Tensor, bank: torch.Tensor, sample: torch.Tensor, row: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """``sum exp(s / T)`` over the scored pairs in float64 (for ``Z``), in chunks."""
    total = torch.zeros((), dtype=torch.float64, device=anchors.device)
    with torch.no_grad():
        for start in range(0, len(sample), PAIRS_PER_CHUNK):
            part = slice(start, start + PAIRS_PER_CHUNK)
            total += torch.exp((bank[row[part]] * anchors[sample[part]]).sum(dim=1).double() / temperature).sum()
    return total


class ContrastMemory:
    """The two banks of one rank and the constants ``Z``; not a module: its rows differ per
    rank, so they are neither broadcast like buffers nor saved from rank 0 alone (the method
    gathers them for checkpoints)."""

    def __init__(self, dataset_size: int, dim: int, seed: int, device: torch.device | str = "cpu",
                 rank_and_world: tuple[int, int] | None = None):
        """``rank_and_world``: the shard to hold (default: this process's rank in its group)."""
        self.size, self.dim = dataset_size, dim
        self.rank, self.world = rank_and_world or world()
        self.rows = len(range(self.rank, dataset_size, self.world))
        self.student, self.teacher = self._initial_rows(seed, device)
        self.z_student = self.z_teacher = -1.0
        self.draws = 0

    def _initial_rows(self, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RepDistiller's init (uniform in ``+-1/sqrt(D/3)``), drawn for the whole bank from one
        seeded generator in fixed chunks and kept where this rank holds the row, so every
        rank count starts from the same banks."""
        stdv = 1.0 / math.sqrt(self.dim / 3)
        gen = torch.Generator().manual_seed(seed)
        banks = []
        for _ in range(2):
            bank, filled = torch.empty(self.rows, self.dim), 0
            for start in range(0, self.size, 1 << 12):  # small chunks: the peak is the bank + 2 MB
                chunk = torch.rand(min(1 << 12, self.size - start), self.dim, generator=gen) * (2 * stdv) - stdv
                mine = chunk[(self.rank - start) % self.world::self.world]
                bank[filled:filled + len(mine)] = mine
                filled += len(mine)
            banks.append(bank.to(device))
        return banks[0], banks[1]

    def bytes_per_rank(self) -> int:
        return 2 * self.student.numel() * self.student.element_size()

    def to(self, device) -> None:
        self.student, self.teacher = self.student.to(device), self.teacher.to(device)

    def held_pairs(self, indices: torch.Tensor, sampler: ContrastSampler, negatives: int,
                   positive: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample, row of this rank's shard, is positive) of the pairs ``(b, c)`` whose row
        this rank holds, ``c`` running over sample ``b``'s positive and its negatives. Drawn
        for blocks of samples, so the full ``B x (K + 1)`` draw is never held at once."""
        parts = []
        for start in range(0, len(indices), SAMPLES_PER_DRAW):
            block = indices[start:start + SAMPLES_PER_DRAW]
            contrast = torch.cat([sampler.positives(self.draws, block, positive)[:, None],
                                  sampler(self.draws, block, negatives)], dim=1)
            sample, column = (contrast % self.world == self.rank).nonzero(as_tuple=True)
            parts.append((sample + start, contrast[sample, column] // self.world, column == 0))
        sample, row, is_positive = (torch.cat(part) for part in zip(*parts))
        return sample, row, is_positive

    def update(self, indices: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, momentum: float) -> None:
        """Momentum update and L2 normalisation of the held rows of ``indices`` (RepDistiller's
        ``ContrastMemory.forward``, after the scores are taken)."""
        held = indices % self.world == self.rank
        rows = indices[held] // self.world
        for bank, new in ((self.student, student[held]), (self.teacher, teacher[held])):
            mixed = bank[rows] * momentum + new.detach().to(bank.dtype) * (1 - momentum)
            bank.index_copy_(0, rows, mixed / mixed.pow(2).sum(1, keepdim=True).sqrt())

    def contrast_loss(self, v_student: torch.Tensor, v_teacher: torch.Tensor, sample_indices: torch.Tensor,
                      sampler: ContrastSampler, negatives: int, temperature: float, momentum: float,
                      positive: str = "exact") -> torch.Tensor:
        """``L(v_S, M_T) + L(v_T, M_S)`` of this rank's share (see the module docstring), then
        the banks' update and the next draw."""
        if self.student.device != v_student.device:
            self.to(v_student.device)
        local_batch = len(v_student)
        v_s, v_t = gather_rows(v_student.float()), gather_rows(v_teacher.float())
        indices = gather_rows(sample_indices.long())
        pairs = self.held_pairs(indices, sampler, negatives, positive)
        z_student, z_teacher = (self.z_student, self.z_teacher) if self.z_student > 0 else \
            self._normalisers(v_s, v_t, pairs, len(indices) * (negatives + 1), temperature)
        sample, row, positive = pairs  # student anchors against the teacher's bank, and the reverse
        loss = (HeldPairsNCE.apply(v_s, self.teacher, sample, row, positive, z_student, temperature, negatives,
                                   self.size)
                + HeldPairsNCE.apply(v_t, self.student, sample, row, positive, z_teacher, temperature, negatives,
                                     self.size)) / local_batch
        # A non-finite embedding makes the loss non-finite, and that step is skipped or stops
        # the run (train.nonfinite): it must not reach the banks (every rank sees the same
        # gathered rows, so all decide alike).
        if bool(torch.isfinite(v_s).all() and torch.isfinite(v_t).all()):
            self.update(indices, v_s, v_t, momentum)
        self.draws += 1
        return loss

    def _normalisers(self, v_s: torch.Tensor, v_t: torch.Tensor, pairs: tuple, scores_in_batch: int,
                     temperature: float) -> tuple[float, float]:
        """``Z = mean(exp(s / T)) * N`` over the global batch's scores, per direction; kept for
        the rest of the run once finite (a non-finite first batch is skipped, the next sets it)."""
        sample, row, _ = pairs
        sums = torch.stack([exp_score_sum(v_s, self.teacher, sample, row, temperature),
                            exp_score_sum(v_t, self.student, sample, row, temperature)])
        if self.world > 1:
            dist.all_reduce(sums)
        z_student, z_teacher = (sums / scores_in_batch * self.size).tolist()
        if math.isfinite(z_student) and math.isfinite(z_teacher) and z_student > 0 and z_teacher > 0:
            self.z_student, self.z_teacher = z_student, z_teacher
            log.info(f"crd: normalisation constants Z set to {z_student:.1f} (student anchors) and "
                     f"{z_teacher:.1f} (teacher anchors)")
        return z_student, z_teacher

    # -- checkpoints ------------------------------------------------------------------
    def gathered(self) -> dict:
        """Both whole banks (on rank 0, None elsewhere; a collective) and the constants."""
        state = {"z_student": self.z_student, "z_teacher": self.z_teacher, "draws": self.draws}
        for name, bank in (("student", self.student), ("teacher", self.teacher)):
            state[name] = self._whole(bank)
        return state

    def _whole(self, bank: torch.Tensor) -> torch.Tensor | None:
        if self.world == 1:
            return bank.detach().cpu().clone()
        most = len(range(0, self.size, self.world))
        padded = torch.zeros(most, self.dim, dtype=bank.dtype, device=bank.device)
        padded[:len(bank)] = bank
        if self.rank != 0:  # only rank 0 writes the checkpoint: the others send their rows
            dist.gather(padded, None, dst=0)
            return None
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.gather(padded, parts, dst=0)
        whole = torch.empty(self.size, self.dim, dtype=bank.dtype)
        for rank, part in enumerate(parts):
            whole[rank::self.world] = part[:len(range(rank, self.size, self.world))].cpu()
        return whole

    def restore(self, state: dict) -> None:
        """Rows of the whole banks that this rank holds (any rank count)."""
        if tuple(state["student"].shape) != (self.size, self.dim):
            raise KdscaleError(f"the checkpoint's memory banks are {tuple(state['student'].shape)}, this run's "
                             f"{(self.size, self.dim)} (dataset size, method.feat_dim); resume with the same "
                             f"training shards and method.feat_dim, or start a new run (experiment.name)")
        device = self.student.device
        self.student = state["student"][self.rank::self.world].to(device).clone()
        self.teacher = state["teacher"][self.rank::self.world].to(device).clone()
        self.z_student, self.z_teacher = float(state["z_student"]), float(state["z_teacher"])
        self.draws = int(state["draws"])
