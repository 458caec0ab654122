"""`Perplexity`: torchmetrics' stateful metric on this project's core (`ppl_core`).

A thin `torchmetrics.Metric` that holds two sums; the math is `ppl_core.pooled_sums` and
`ppl_core.perplexity_from_sums`. It lives apart from the core so that the runner, the command
line and Ray actors do not import torchmetrics (about a second) for a class they never use.
"""

import math  # the doctests use it

import torch
from torchmetrics import Metric

if __package__:  # copied by evaluate.load next to perplexity_metric.py
    from .ppl_core import check_ignore_index, perplexity_from_sums, pooled_sums
else:
    from ppl_core import check_ignore_index, perplexity_from_sums, pooled_sums

__all__ = ["Perplexity"]


class Perplexity(Metric):
    """torchmetrics' `Perplexity` on this module's core: a `torchmetrics.Metric` of two sums.

    The state is a float64 NLL sum and an int64 token count, both reduced by "sum", so batch
    splits, `forward`, `merge_state` and DDP give the number of one pass over all the data.
    Every option of `torchmetrics.Metric` (`dist_sync_on_step`, `compute_on_cpu`,
    `sync_on_compute`, `process_group`, ...) passes through `**kwargs`.

    Where it differs from torchmetrics on purpose: `compute` with no scored token raises
    instead of returning NaN, a `forward` that raises leaves the running sums as they were,
    the result is float64 and the sums stay float64 under `.half()`/`set_dtype`.

    Example:
        >>> metric = Perplexity(ignore_index=-100)
        >>> preds = torch.full((1, 4, 8), math.log(1 / 8))
        >>> round(metric(preds, torch.tensor([[1, 2, 3, -100]])).item(), 6)
        8.0
        >>> round(metric.compute().item(), 6)
        8.0
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 1.0

    def __init__(self, ignore_index=None, **kwargs):
        super().__init__(**kwargs)
        check_ignore_index(ignore_index)
        self.ignore_index = ignore_index
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds, target):
        """Add a batch to the running sums (a batch of padding only adds nothing)."""
        nll_sum, count = pooled_sums(preds, target, self.ignore_index)
        self.nll_sum += nll_sum.to(self.nll_sum.device)
        self.count += count.to(self.count.device)

    def compute(self):
        """Perplexity over everything added since the last `reset` (on every process, once synced)."""
        if int(self.count) == 0 and self._is_synced:
            self.unsync()  # torchmetrics' sync context would keep the gathered state after the error below
        return perplexity_from_sums(self.nll_sum, self.count)

    @torch.jit.unused
    def forward(self, *args, **kwargs):
        """This batch's perplexity, also added to the running sums (torchmetrics' forward).

        `Metric.forward` resets the state to score the batch alone; if the batch is refused
        (bad input, or every token ignored) the running sums and settings are put back.
        """
        saved = self._copy_state_dict(), self._update_count, self.compute_on_cpu, self._to_sync, self._should_unsync
        try:
            return super().forward(*args, **kwargs)
        except Exception:
            state, self._update_count, self.compute_on_cpu, self._to_sync, self._should_unsync = saved
            for name, value in state.items():
                setattr(self, name, value)
            self._enable_grad, self._computed, self._is_synced, self._cache = False, None, False, None
            raise

    def _apply(self, fn, exclude_state=()):
        # `.to(torch.bfloat16)` or `set_dtype` (which casts integers too) move the sums but must
        # not round them: a float16 sum or count is exact only to 2048
        this = super()._apply(fn, exclude_state=(*exclude_state, "nll_sum", "count"))
        for name in ("nll_sum", "count"):
            setattr(this, name, getattr(this, name).to(this.device))
            this._defaults[name] = this._defaults[name].to(this.device)
        return this

    def plot(self, val=None, ax=None):
        """Plot `val` (a value or a list of values from `forward`/`compute`; default `compute()`).

        Needs matplotlib. Returns torchmetrics' `(figure, axes)`.
        """
        return self._plot(val, ax)
