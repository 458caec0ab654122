"""Score a corpus with a causal LM over several processes: torchrun, accelerate launch, gloo or nccl.

Every rank receives the same full list of texts and scores its own shard (texts dealt out
longest first, round-robin, so shards carry similar work). Each rank reduces its texts to
per-text NLL sums and token counts; these are gathered once, through the process group's
c10d key-value store (plain CPU bytes, so nccl ranks need no device handling for it), and
the result is rebuilt in the original text order with the same functions one process uses
(`ppl_runner.pool_texts`), so it equals `ppl_runner.evaluate_texts` on one process: same per-text
values, same pooled value (bit for bit when each text's forward passes do not depend on
its batch neighbours, e.g. `batch_size=1`; otherwise float32 noise of ~1e-8, which one
process shows too when its batching changes).

Peers that fail are reported, never papered over:
- a rank that does not join within `timeout` -> rank 0 raises naming the missing ranks;
- a rank that dies, or is still scoring `timeout` after rank 0 finished -> rank 0 raises
  naming the ranks that did not finish (at once for a dead one: its connection closes);
  no partial result is returned;
- a rank whose scoring raised (a bad text) -> that rank and rank 0 raise with its error,
  the text's index given in the whole corpus.

The command line is `ppl_cli.py`, which detects torchrun and accelerate launch itself and
streams each rank its share of the corpus (`python -m ppl_dist ...` is an alias of it):
    torchrun --nproc_per_node 2 ppl_cli.py --corpus texts.jsonl --model ./my-model
"""

import contextlib
import datetime
import hashlib
import itertools
import os
import pickle
import re
import sys
import time

import torch
import torch.distributed as dist

if __package__:
    from .ppl_runner import check_texts, evaluate_texts, nll_per_text, pool_texts
else:
    from ppl_runner import check_texts, evaluate_texts, nll_per_text, pool_texts

__all__ = ["DistributedScoringError", "distributed_session", "score_corpus_distributed", "setup_distributed", "shard_indices"]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
_POLL_SECONDS = 0.05
_calls = itertools.count()  # every rank calls in the same order, so call k uses the same store keys everywhere


class DistributedScoringError(RuntimeError):
    """A peer did not join, died, or did not finish in time; the message names the ranks."""


# ---------------------------------------------------------------------------------------
# Pure pieces: sharding and merging
# ---------------------------------------------------------------------------------------


def shard_indices(lengths, rank, world_size):
    """Original indices scored by `rank`: items dealt longest first, round-robin.

    Shards differ by at most one item and carry similar amounts of text; each index lands
    in exactly one shard. Ties keep input order, so every rank computes the same plan.

    >>> [shard_indices([5, 1, 4, 2, 3], r, 2) for r in range(2)]
    [[0, 4, 1], [2, 3]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return order[rank::world_size]


def merge_shards(payloads, num_texts):
    """Per-text NLL sums and counts in original order from every rank's `(indices, nll_sums, counts)`.

    Raises:
        ValueError: a text scored twice or not at all (the ranks disagree on the plan).
    """
    nll_sums, counts = [None] * num_texts, [None] * num_texts
    for indices, shard_nll, shard_counts in payloads:
        for i, nll, count in zip(indices, shard_nll, shard_counts):
            if counts[i] is not None:
                raise ValueError(f"Text {i} was scored by more than one rank.")
            nll_sums[i], counts[i] = nll, count
    missing = [i for i, c in enumerate(counts) if c is None]
    if missing:
        raise ValueError(f"Texts {missing[:10]} were scored by no rank.")
    return nll_sums, counts


def corpus_fingerprint(texts):
    """A short digest of the texts and their order, to check that every rank got the same corpus."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------


def _as_timedelta(timeout):
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"Expected `timeout` in seconds or as a datetime.timedelta, but got {timeout!r}.")
    if not seconds > 0:
        raise ValueError(f"Expected `timeout` > 0 seconds, but got {seconds}.")
    return datetime.timedelta(seconds=seconds)


def _env_int(name, default=None):
    value = os.environ.get(name)
    if value in (None, ""):
        if default is None:
            raise ValueError(f"Expected the environment variable {name} (torchrun and accelerate launch set it).")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Expected the environment variable {name} to be an integer, but got {value!r}.") from None


def _rendezvous_store(rank, world_size, timeout):
    """The c10d TCP store, as `init_method="env://"` would make it, but without the server
    blocking until everyone connected, so that rank 0 can name who is missing."""
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        raise ValueError("Expected the environment variable MASTER_ADDR (torchrun and accelerate launch set it).")
    port = _env_int("MASTER_PORT")
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent runs the server
    try:
        return dist.TCPStore(
            addr, port, world_size, is_master=rank == 0 and not agent_hosts_store, timeout=timeout,
            wait_for_workers=False, multi_tenant=True,
        )
    except (RuntimeError, dist.DistError) as err:  # DistNetworkError / DistStoreError
        where = "host the rendezvous" if rank == 0 and not agent_hosts_store else "reach rank 0's rendezvous"
        raise DistributedScoringError(
            f"Rank {rank} could not {where} at {addr}:{port} within {timeout.total_seconds():g} s: {_first_line(err)}"
        ) from None


def _wait_for_keys(store, keys, timeout):
    """Poll the store until every key exists or `timeout` passes; return the ranks still missing."""
    deadline = time.monotonic() + timeout.total_seconds()
    pending = dict(keys)  # rank -> key
    while pending:
        pending = {r: k for r, k in pending.items() if not store.check([k])}
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(_POLL_SECONDS)
    return sorted(pending)


def setup_distributed(*, timeout=DEFAULT_TIMEOUT, backend=None):
    """Join (or reuse) the torch.distributed process group described by the environment.

    Uses the group when one is initialised already (e.g. by `accelerate.Accelerator`).
    Otherwise, with WORLD_SIZE > 1 in the environment (torchrun, accelerate launch, or set by
    hand with RANK, MASTER_ADDR, MASTER_PORT), initialises one: rank 0 waits at most
    `timeout` for every rank to join and raises naming those that did not; then gloo (CPU)
    or nccl (GPU, one device per LOCAL_RANK) with `timeout` bounding its collectives.
    Without WORLD_SIZE (or with 1) nothing is initialised: one process.

    Args:
        timeout: seconds or a timedelta.
        backend: "gloo", "nccl" or None (nccl when CUDA is available, else gloo).

    Returns:
        dict with rank, world_size, local_rank, device (None on one process, else "cpu", or
        "cuda:<local_rank>" for nccl), initialized_here (whether this call created the group,
        so the caller destroys it; `distributed_session` does) and store (the group's c10d
        store, which carries the gathered sums; None when unknown).

    Raises:
        DistributedScoringError: a rank that does not join within `timeout`.
        ValueError: inconsistent environment variables or an unknown backend.
    """
    timeout = _as_timedelta(timeout)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", 0)
        uses_nccl = "nccl" in str(dist.get_backend()).lower()
        device = f"cuda:{torch.cuda.current_device()}" if uses_nccl else "cpu"
        try:
            store = dist.distributed_c10d._get_default_store()  # private API: without it, all_gather_object
        except Exception:  # noqa: BLE001 - any failure here only means the fallback gather
            store = None
        return {"rank": rank, "world_size": world_size, "local_rank": local_rank, "device": device,
                "initialized_here": False, "store": store}
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"Expected WORLD_SIZE >= 1, but got {world_size}.")
    if world_size == 1:
        return {"rank": 0, "world_size": 1, "local_rank": 0, "device": None, "initialized_here": False, "store": None}
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    rank = _env_int("RANK")
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected RANK in [0, WORLD_SIZE={world_size}), but got {rank}.")
    local_rank = _env_int("LOCAL_RANK", rank)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"Expected `backend` 'gloo' or 'nccl', but got {backend!r}.")

    store = _rendezvous_store(rank, world_size, timeout)
    prefix = "ppl_dist/" + "/".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"))
    store.set(f"{prefix}/joined/{rank}", "1")
    if rank == 0:
        missing = _wait_for_keys(store, {r: f"{prefix}/joined/{r}" for r in range(world_size)}, timeout)
        if missing:
            raise DistributedScoringError(
                f"Rank(s) {missing} of {world_size} did not join within {timeout.total_seconds():g} s "
                f"(rendezvous at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}); no result."
            )
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    try:
        dist.init_process_group(
            backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world_size, timeout=timeout
        )
    except (RuntimeError, dist.DistError) as err:
        raise DistributedScoringError(
            f"Rank {rank} could not form the {backend} process group of {world_size} within "
            f"{timeout.total_seconds():g} s (rank 0 gone, or a peer missing?): {_first_line(err)}"
        ) from None
    return {"rank": rank, "world_size": world_size, "local_rank": local_rank, "device": device,
            "initialized_here": True, "store": store}


@contextlib.contextmanager
def distributed_session(*, timeout=DEFAULT_TIMEOUT, backend=None):
    """`setup_distributed` for a `with` block; a group it created is destroyed on leaving.

    Load the model inside it on `ctx["device"]` (None on one process: the best available),
    then call `score_corpus_distributed`, which reuses the group.
    """
    ctx = setup_distributed(timeout=timeout, backend=backend)
    try:
        yield ctx
    finally:
        if ctx["initialized_here"] and dist.is_initialized():
            dist.destroy_process_group()


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _original_indices(message, indices):
    """Rewrite `texts[k]` (an index into this rank's shard) as the index in the whole corpus."""
    return re.sub(r"`texts\[(\d+)\]`", lambda m: f"`texts[{indices[int(m.group(1))]}]`", message)


# ---------------------------------------------------------------------------------------
# Many processes
# ---------------------------------------------------------------------------------------


def score_corpus_distributed(
    model, tokenizer, texts, *, timeout=DEFAULT_TIMEOUT, all_ranks=False, backend=None, bootstrap_resamples=1000, seed=0,
    **runner_kwargs,
):
    """`ppl_runner.evaluate_texts` over the ranks of a torch.distributed job; rank 0 gets the result.

    Every rank must call this with the same texts and settings (checked: a rank with a
    different corpus or settings is an error). Each scores its shard (`shard_indices`); the
    per-text NLL sums and counts are gathered once, and the result equals one process's
    `evaluate_texts(model, tokenizer, texts)`: per-text values in the original order.
    Without a process group and without WORLD_SIZE > 1 in the environment it is exactly
    `evaluate_texts`. A group created here is destroyed before returning.

    Args:
        model: the causal LM, already on this rank's device (e.g. `cuda:LOCAL_RANK` with
            nccl: load it inside `distributed_session()`, which says which).
        tokenizer, texts, bootstrap_resamples, runner_kwargs: as for `evaluate_texts`.
        timeout: seconds or timedelta: how long rank 0 waits for peers to join, and how long
            any rank waits for the others once its own shard is done.
        all_ranks: return the result on every rank (each then reads every rank's sums);
            by default ranks other than 0 return None, as evaluate's do.
        backend: for a group created here: "gloo", "nccl" or None (see `setup_distributed`).

    Returns:
        the result dict on rank 0 (and on every rank with `all_ranks`), else None.

    Raises:
        DistributedScoringError: a rank that did not join, died, or did not finish within
            `timeout`; the message names the ranks.
        ValueError, TypeError: bad input. A bad text raises on the rank that scored it and
            on rank 0 (on every rank with `all_ranks`), naming the rank and the text's index.
    """
    texts = check_texts(texts)  # same data on every rank, so every rank raises the same error here
    timeout = _as_timedelta(timeout)
    ctx = setup_distributed(timeout=timeout, backend=backend)
    if ctx["world_size"] == 1:
        return evaluate_texts(model, tokenizer, texts, bootstrap_resamples=bootstrap_resamples, seed=seed, **runner_kwargs)
    try:
        return _score_and_gather(model, tokenizer, texts, ctx, timeout, all_ranks, bootstrap_resamples, seed, runner_kwargs)
    finally:
        if ctx["initialized_here"]:
            dist.destroy_process_group()


def gather_payloads(payload, ctx, *, timeout=DEFAULT_TIMEOUT, all_ranks=False):
    """Every rank's picklable `payload`, in rank order, on rank 0 (every rank with `all_ranks`);
    None on the others. Dead or late peers raise `DistributedScoringError` naming them."""
    timeout = _as_timedelta(timeout)
    # monitored_barrier exists on gloo only; with nccl a gloo group over the same ranks does it.
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    try:
        return _gather_once(payload, ctx["rank"], ctx["world_size"], ctx["store"], group, f"ppl_dist/call{next(_calls)}",
                            timeout, all_ranks)
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def barrier(ctx, *, timeout=DEFAULT_TIMEOUT):
    """Wait for every rank (a no-op on one process); a missing rank raises, named."""
    if ctx["world_size"] > 1:
        gather_payloads(None, ctx, timeout=timeout, all_ranks=True)


def _score_and_gather(model, tokenizer, texts, ctx, timeout, all_ranks, bootstrap_resamples, seed, runner_kwargs):
    rank, world_size = ctx["rank"], ctx["world_size"]

    indices = shard_indices([len(t) for t in texts], rank, world_size)
    payload = {
        "rank": rank,
        "corpus": (len(texts), corpus_fingerprint(texts)),
        # what changes the numbers must agree; `progress=(rank == 0)` is a common, harmless difference
        "settings": repr(sorted({**runner_kwargs, "bootstrap_resamples": bootstrap_resamples, "seed": seed, "progress": None}.items())),
        "indices": indices,
    }
    try:
        payload["nll_sums"], payload["counts"] = nll_per_text(model, tokenizer, [texts[i] for i in indices], **runner_kwargs)
    except (ValueError, TypeError) as err:  # reported through the gather, so no rank waits for a timeout
        payload["error"] = (type(err).__name__, _original_indices(str(err), indices))

    gathered = gather_payloads(payload, ctx, timeout=timeout, all_ranks=all_ranks)
    if gathered is None:  # a rank other than 0: it reports its own error, rank 0 reports everyone's
        gathered = [payload]
    for other in gathered:
        if "error" in other:
            kind, message = other["error"]
            raise (TypeError if kind == "TypeError" else ValueError)(f"On rank {other['rank']}: {message}")
    for other in gathered[1:]:
        if other["corpus"] != gathered[0]["corpus"]:
            raise ValueError(
                f"Rank {other['rank']} received a different corpus ({other['corpus'][0]} texts, digest "
                f"{other['corpus'][1]}) than rank 0 ({gathered[0]['corpus'][0]} texts, digest {gathered[0]['corpus'][1]})."
            )
        if other["settings"] != gathered[0]["settings"]:
            raise ValueError(f"Rank {other['rank']} scored with settings {other['settings']}, rank 0 with {gathered[0]['settings']}.")
    if rank != 0 and not all_ranks:
        return None
    nll_sums, counts = merge_shards([(p["indices"], p["nll_sums"], p["counts"]) for p in gathered], len(texts))
    return pool_texts(nll_sums, counts, texts, bootstrap_resamples=bootstrap_resamples, seed=seed)


def _gather_once(payload, rank, world_size, store, group, prefix, timeout, all_ranks):
    """Every rank's payload, on rank 0 (and on every rank with `all_ranks`); None elsewhere.

    The payloads travel through the c10d key-value store (synchronous calls on the CPU,
    whatever the backend). `all_gather_object` would do the same job, but gloo's worker
    threads release its tensors asynchronously, and a rank that exits right after it can
    abort in interpreter shutdown ("terminate called without an active exception",
    measured here about 1 run in 15 with torch 2.13). A gloo `monitored_barrier` (no Python
    tensors involved) makes a dead peer fail rank 0 at once and names late ones.
    """
    key = f"{prefix}/payload/{{}}".format
    if store is None:  # a group initialised elsewhere whose store torch does not expose
        gathered = [None] * world_size
        try:
            dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
            dist.all_gather_object(gathered, payload, group=group)
        except (RuntimeError, dist.DistError) as err:
            raise _peer_failure(err, rank, world_size, None, key, timeout) from None
        return gathered
    store.set(key(rank), pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    try:
        dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
    except (RuntimeError, dist.DistError) as err:
        raise _peer_failure(err, rank, world_size, store, key, timeout) from None
    if rank != 0 and not all_ranks:
        return None
    gathered = [pickle.loads(store.get(key(r))) for r in range(world_size)]  # all set before the barrier
    if all_ranks:  # rank 0 may host the store: it leaves only after everyone has read
        try:
            dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
        except (RuntimeError, dist.DistError) as err:
            raise _peer_failure(err, rank, world_size, None, key, timeout) from None
    if rank == 0:  # everyone who reads has read: free the store's memory in long jobs
        for r in range(world_size):
            store.delete_key(key(r))
    return gathered


def _peer_failure(err, rank, world_size, store, key, timeout):
    """The barrier failed (a peer died or is late): name the ranks whose payload never arrived."""
    missing = []
    if store is not None:
        try:
            missing = [r for r in range(world_size) if r != rank and not store.check([key(r)])]
        except Exception:  # noqa: BLE001 - the store may have died with rank 0
            missing = []
    match = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(err))
    if not missing and match:
        missing = [int(r) for r in re.findall(r"\d+", match.group(1))]
    who = f"Rank(s) {missing}" if missing else "A peer (rank 0, or one it lost)"
    return DistributedScoringError(
        f"{who} of {world_size} did not finish scoring (died, or still busy {timeout.total_seconds():g} s after "
        f"rank {rank} finished); no result. Cause on rank {rank}: {_first_line(err)}"
    )


# ---------------------------------------------------------------------------------------
# Command line: an alias of ppl_cli.py, which detects torchrun / accelerate itself
# ---------------------------------------------------------------------------------------


def main(argv=None):
    """`python -m ppl_dist ARGS` runs `ppl_cli.py ARGS` (the one command line)."""
    if __package__:
        from .ppl_cli import main as cli_main
    else:
        from ppl_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
