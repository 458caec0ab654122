"""`Perplexity` as a drop-in for `torchmetrics.text.Perplexity`: the torchmetrics test protocol for
this metric (batch by batch and aggregate against a float64 reference, forward = update + compute,
pickling, clone, state_dict, TorchScript, gradcheck, DDP in two real gloo processes) and its use
in `MetricCollection` and in a real Lightning validation loop.

The reference is the five-line float64 `exp(cross_entropy)` of conftest, never the code under test."""

import copy
import datetime
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.text import Perplexity as TMPerplexity

from conftest import reference_ppl
from ppl_core import perplexity  # light for the DDP workers; perplexity_metric re-exports both
from ppl_torchmetrics import Perplexity

NUM_BATCHES, BATCH_SIZE, SEQ_LEN, VOCAB = 4, 2, 12, 17
IGNORE_CASES = [None, -100, 3]  # no padding; torchmetrics' usual -100; an id inside the vocabulary


def batches(dtype=torch.float32, ignore_index=None, seed=0):
    """`NUM_BATCHES` batches of logits and targets; about one target in four is `ignore_index`."""
    gen = torch.Generator().manual_seed(seed)
    preds = (torch.randn(NUM_BATCHES, BATCH_SIZE, SEQ_LEN, VOCAB, generator=gen) * 2).to(dtype)
    target = torch.randint(VOCAB, (NUM_BATCHES, BATCH_SIZE, SEQ_LEN), generator=gen)
    if ignore_index is not None:
        target[torch.rand(target.shape, generator=gen) < 0.25] = ignore_index
    return preds, target


def reference(preds, target, ignore_index):
    """float64 reference over batches `[n, batch, seq_len, vocab]` or one batch `[batch, seq_len, vocab]`."""
    return reference_ppl(preds.reshape(-1, SEQ_LEN, VOCAB), target.reshape(-1, SEQ_LEN), ignore_index)


# ---------------------------------------------------------------------------------------
# The class protocol, one process
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", IGNORE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_batch_and_the_aggregate_match_the_float64_reference(dtype, ignore_index):
    preds, target = batches(dtype, ignore_index)
    metric = Perplexity(ignore_index=ignore_index)
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    for p, t in zip(preds, target):
        assert metric(p, t).item() == pytest.approx(reference(p, t, ignore_index), rel=rel)  # forward: this batch
    assert metric.compute().item() == pytest.approx(reference(preds, target, ignore_index), rel=rel)
    assert metric.compute().item() == pytest.approx(TMPerplexity(ignore_index=ignore_index)(
        preds.reshape(-1, SEQ_LEN, VOCAB), target.reshape(-1, SEQ_LEN)).item(), rel=1e-5)


@pytest.mark.parametrize("ignore_index", [None, -100])
def test_forward_equals_update_then_compute_and_accumulates_the_same(ignore_index):
    preds, target = batches(ignore_index=ignore_index, seed=1)
    forwarded, updated = Perplexity(ignore_index=ignore_index), Perplexity(ignore_index=ignore_index)
    for p, t in zip(preds, target):
        batch_value = forwarded(p, t)
        alone = Perplexity(ignore_index=ignore_index)
        alone.update(p, t)
        assert batch_value.item() == alone.compute().item()  # the same sums, the same float64 arithmetic
        updated.update(p, t)
    assert forwarded.compute().item() == updated.compute().item()
    assert forwarded.update_count == updated.update_count == NUM_BATCHES


def test_half_inputs_give_finite_values_near_the_float64_reference():
    preds, target = batches(torch.float16, ignore_index=-100, seed=2)
    metric = Perplexity(ignore_index=-100)
    for p, t in zip(preds, target):
        metric.update(p, t)
    value = metric.compute()
    assert value.dtype == torch.float64 and math.isfinite(value.item())
    # the reference reads the same float16 values in float64: only the core's float32 log-softmax differs
    assert value.item() == pytest.approx(reference(preds, target, -100), rel=1e-5)
    assert perplexity(preds[0], target[0], ignore_index=-100).item() == pytest.approx(
        reference(preds[0], target[0], -100), rel=1e-5)


def test_large_logits_stay_finite_where_torchmetrics_overflows():
    preds, target = batches(ignore_index=-100, seed=3)
    preds, target = preds[0] * 50, target[0]
    expected = reference(preds, target, -100)
    assert math.isfinite(expected)
    assert Perplexity(ignore_index=-100)(preds, target).item() == pytest.approx(expected, rel=1e-6)
    assert TMPerplexity(ignore_index=-100)(preds, target).item() == math.inf  # softmax then log underflows


def test_pickle_clone_deepcopy_and_hash_keep_the_state_apart():
    preds, target = batches(ignore_index=-100, seed=4)
    metric = Perplexity(ignore_index=-100)
    metric.update(preds[0], target[0])
    for copied in (pickle.loads(pickle.dumps(metric)), metric.clone(), copy.deepcopy(metric)):
        assert type(copied) is Perplexity and copied is not metric and copied.ignore_index == -100
        copied.update(preds[1], target[1])
        assert copied.compute().item() == pytest.approx(reference(preds[:2], target[:2], -100), rel=1e-6)
    assert metric.compute().item() == pytest.approx(reference(preds[0], target[0], -100), rel=1e-6)
    assert hash(metric)


def test_state_dict_is_empty_unless_persistent_and_then_round_trips():
    preds, target = batches(seed=5)
    metric = Perplexity()
    metric.update(preds[0], target[0])
    assert metric.state_dict() == {}  # torchmetrics' default: states are not saved with a model
    metric.persistent(True)
    state = metric.state_dict()
    assert set(state) == {"nll_sum", "count"} and state["nll_sum"].dtype == torch.float64
    restored = Perplexity()
    restored.persistent(True)
    restored.load_state_dict(state)
    assert restored.compute().item() == metric.compute().item()


def test_class_attributes_are_torchmetrics_and_cannot_be_reassigned():
    import perplexity_metric

    assert (perplexity_metric.Perplexity, perplexity_metric.perplexity) == (Perplexity, perplexity)  # the users' import
    metric = Perplexity()
    assert isinstance(metric, Metric)
    assert (metric.is_differentiable, metric.higher_is_better, metric.full_state_update) == (True, False, False)
    for name in ("is_differentiable", "higher_is_better", "full_state_update"):
        with pytest.raises(RuntimeError):
            setattr(metric, name, not getattr(metric, name))


def test_every_metric_option_passes_through_to_torchmetrics():
    metric = Perplexity(ignore_index=-100, dist_sync_on_step=True, compute_on_cpu=True, sync_on_compute=False,
                        compute_with_cache=False)
    assert (metric.dist_sync_on_step, metric.compute_on_cpu, metric.sync_on_compute, metric.compute_with_cache) == (
        True, True, False, False)
    with pytest.raises(ValueError, match="Unexpected keyword arguments: `not_an_option`"):
        Perplexity(not_an_option=1)


def test_torchscript_compiles_the_metric_as_torchmetrics_does():
    preds, target = batches(ignore_index=-100, seed=6)
    scripted = torch.jit.script(Perplexity(ignore_index=-100))
    torch.jit.script(TMPerplexity(ignore_index=-100))  # the same call is what torchmetrics supports
    assert isinstance(scripted, torch.jit.ScriptModule)
    eager = Perplexity(ignore_index=-100)
    eager.update(preds[0], target[0])
    assert eager.compute().item() == pytest.approx(reference(preds[0], target[0], -100), rel=1e-6)


def test_merge_state_of_two_halves_gives_the_whole():
    preds, target = batches(ignore_index=-100, seed=7)
    first, second = Perplexity(ignore_index=-100), Perplexity(ignore_index=-100)
    for k in range(NUM_BATCHES):
        (first if k < 2 else second).update(preds[k], target[k])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(reference(preds, target, -100), rel=1e-6)


def test_sums_stay_float64_under_set_dtype_and_half_and_move_with_the_metric():
    preds, target = batches(seed=8)
    metric = Perplexity()
    metric.update(preds[0], target[0])
    before = metric.nll_sum.item()
    metric.set_dtype(torch.half)
    torch.nn.Sequential(metric).half().to(torch.bfloat16)
    assert metric.nll_sum.dtype == torch.float64 and metric.count.dtype == torch.int64
    assert metric.nll_sum.item() == before  # not rounded to 11 bits
    metric.reset()
    assert metric.nll_sum.dtype == torch.float64  # the default it resets to is float64 too


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [None, -100])
def test_gradcheck_passes_for_the_function_and_the_class_in_float64(ignore_index):
    preds, target = batches(torch.float64, ignore_index, seed=9)
    p = preds[0, :, :3].clone().requires_grad_()  # gradcheck perturbs every element: keep it small
    t = target[0, :, :3]
    assert torch.autograd.gradcheck(lambda x: perplexity(x, t, ignore_index=ignore_index), (p,))

    # as in torchmetrics, the class's gradient flows through forward (update runs without grad)
    assert torch.autograd.gradcheck(lambda x: Perplexity(ignore_index=ignore_index)(x, t), (p,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_gradient_equals_autograd_through_a_float64_cross_entropy(dtype):
    preds, target = batches(dtype, ignore_index=-100, seed=10)
    view = preds[0, :, :-1]  # a non-contiguous view, as a model's shifted logits are
    ours = view.clone().requires_grad_()
    perplexity(ours, target[0, :, 1:], ignore_index=-100).backward()
    theirs = view.double().clone().requires_grad_()
    torch.exp(F.cross_entropy(theirs.reshape(-1, VOCAB), target[0, :, 1:].reshape(-1), ignore_index=-100)).backward()
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-8 if dtype == torch.float32 else 1e-15)


def test_forward_carries_the_gradient_and_inference_inputs_do_not():
    preds, target = batches(ignore_index=-100, seed=11)
    metric = Perplexity(ignore_index=-100)
    p = preds[0].clone().requires_grad_()
    value = metric(p, target[0])
    assert value.requires_grad  # what torchmetrics' differentiability test asserts
    value.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    assert not metric.compute().requires_grad  # the running sums are not part of any graph
    assert not perplexity(preds[0], target[0], ignore_index=-100).requires_grad
    with torch.no_grad():
        assert not perplexity(p, target[0], ignore_index=-100).requires_grad


# ---------------------------------------------------------------------------------------
# Refusals keep the state; nothing scored
# ---------------------------------------------------------------------------------------


def test_a_refused_forward_leaves_the_running_sums_and_settings_as_they_were():
    preds, target = batches(ignore_index=-100, seed=12)
    metric = Perplexity(ignore_index=-100, compute_on_cpu=True)
    metric(preds[0], target[0])
    bad = preds[1].clone()
    bad[0, 0, target[1][0, 0] if target[1][0, 0] != -100 else 0] = math.nan
    target_bad = target[1].clone()
    target_bad[0, 0] = 0 if target[1][0, 0] == -100 else target[1][0, 0]
    with pytest.raises(ValueError, match="`preds`"):
        metric(bad, target_bad)  # found only after Metric.forward has reset the state
    with pytest.raises(ValueError, match="No token was scored"):
        metric(preds[1], torch.full_like(target[1], -100))
    assert metric.compute_on_cpu and metric.update_count == 1
    metric(preds[2], target[2])
    assert metric.compute().item() == pytest.approx(reference(preds[[0, 2]], target[[0, 2]], -100), rel=1e-6)


def test_compute_with_nothing_scored_raises_where_torchmetrics_returns_nan():
    preds, target = batches(seed=13)
    padding = torch.full_like(target[0], -100)
    theirs = TMPerplexity(ignore_index=-100)
    theirs.update(preds[0], padding)
    assert math.isnan(theirs.compute().item())
    ours = Perplexity(ignore_index=-100)
    ours.update(preds[0], padding)  # a batch of padding alone is accepted: it adds nothing
    with pytest.raises(ValueError, match="No token was scored"):
        ours.compute()


# ---------------------------------------------------------------------------------------
# Collections, arithmetic, plotting
# ---------------------------------------------------------------------------------------


def test_metric_collection_and_metric_arithmetic():
    preds, target = batches(ignore_index=-100, seed=14)
    collection = MetricCollection({"ppl": Perplexity(ignore_index=-100), "tm_ppl": TMPerplexity(ignore_index=-100)},
                                  prefix="val_")
    doubled = Perplexity(ignore_index=-100) * 2
    for p, t in zip(preds, target):
        collection.update(p, t)
        doubled.update(p, t)
    values = collection.compute()
    expected = reference(preds, target, -100)
    assert set(values) == {"val_ppl", "val_tm_ppl"}
    assert values["val_ppl"].item() == pytest.approx(expected, rel=1e-6)
    assert values["val_tm_ppl"].item() == pytest.approx(expected, rel=1e-5)
    assert doubled.compute().item() == pytest.approx(2 * expected, rel=1e-6)


def test_plot_draws_the_values_with_matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    preds, target = batches(seed=15)
    metric = Perplexity()
    values = [metric(p, t) for p, t in zip(preds, target)]
    fig, ax = metric.plot(values)
    line = ax.get_lines()[0]
    assert [round(v, 9) for v in line.get_ydata()] == [round(v.item(), 9) for v in values]
    fig, ax = metric.plot()  # default: compute()
    assert fig is not None


# ---------------------------------------------------------------------------------------
# DDP: two real gloo processes
# ---------------------------------------------------------------------------------------


DDP_CASES = [(ignore_index, on_step) for ignore_index in (None, -100) for on_step in (False, True)]


def _ddp_worker(rank, world_size, init_file, out_dir):
    """One rank of a real gloo group; every case runs in the same two processes (starting them dominates)."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        results = []
        for ignore_index, dist_sync_on_step in DDP_CASES:
            preds, target = batches(ignore_index=ignore_index, seed=16)
            metric = Perplexity(ignore_index=ignore_index, dist_sync_on_step=dist_sync_on_step)
            local = Perplexity(ignore_index=ignore_index, sync_on_compute=False)
            steps = []
            for k in range(rank, NUM_BATCHES, world_size):  # torchmetrics' split: batch k on rank k % world_size
                steps.append(metric(preds[k], target[k]).item())
                local.update(preds[k], target[k])
            results.append({"steps": steps, "synced": metric.compute().item(), "local": local.compute().item()})
        # nothing scored on any rank: compute refuses, and the metric is not left synced (it works afterwards)
        metric = Perplexity(ignore_index=-100)
        metric.update(preds[0], torch.full_like(target[0], -100))
        try:
            metric.compute()
            refused = False
        except ValueError:
            refused = True
        metric.update(preds[rank], target[rank])
        results.append({"refused": refused, "after": metric.compute().item()})
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_give_the_one_process_value(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, nprocs=2, join=True, args=(2, str(tmp_path / "init"), str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    preds, target = batches(ignore_index=-100, seed=16)
    for rank in range(2):
        assert ranks[rank][-1]["refused"]
        assert ranks[rank][-1]["after"] == pytest.approx(reference(preds[:2], target[:2], -100), rel=1e-6)
    for case, (ignore_index, dist_sync_on_step) in enumerate(DDP_CASES):
        preds, target = batches(ignore_index=ignore_index, seed=16)
        everything = reference(preds, target, ignore_index)
        for rank in range(2):
            values, mine = ranks[rank][case], list(range(rank, NUM_BATCHES, 2))
            assert values["synced"] == pytest.approx(everything, rel=1e-6)
            assert values["local"] == pytest.approx(reference(preds[mine], target[mine], ignore_index), rel=1e-6)
            assert values["local"] != pytest.approx(everything, rel=1e-3)  # the sync is what joins them
            for step, k in enumerate(mine):
                # dist_sync_on_step: each forward's value covers the batches of both ranks at that step
                both = [k - rank, k - rank + 1] if dist_sync_on_step else [k]
                assert values["steps"][step] == pytest.approx(
                    reference(preds[both], target[both], ignore_index), rel=1e-6)


# ---------------------------------------------------------------------------------------
# Lightning: the metric object logged from a validation loop
# ---------------------------------------------------------------------------------------


def test_a_lightning_validation_loop_logs_the_metric_object():
    import lightning as L

    preds, target = batches(ignore_index=-100, seed=17)
    torch.manual_seed(0)

    class TinyLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 8)
            self.head = torch.nn.Linear(8, VOCAB)
            self.val_ppl = Perplexity(ignore_index=-100)

        def forward(self, ids):
            return self.head(self.embed(ids))  # (batch, seq_len, vocab)

        def validation_step(self, batch, batch_idx):
            ids, labels = batch
            self.val_ppl.update(self(ids), labels)
            self.log("val_ppl", self.val_ppl, on_epoch=True)  # Lightning calls compute() and reset()

    model = TinyLM()
    ids = target.clamp(min=0)
    loader = torch.utils.data.DataLoader(list(zip(ids.reshape(-1, SEQ_LEN), target.reshape(-1, SEQ_LEN))),
                                         batch_size=3)  # 8 sequences in batches of 3, 3 and 2
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(model, loader, verbose=False)[0]["val_ppl"]
    with torch.no_grad():
        logits = model(ids.reshape(-1, SEQ_LEN))
    assert logged == pytest.approx(reference_ppl(logits, target.reshape(-1, SEQ_LEN), -100), rel=1e-6)
