"""The eigenvalue correction replays the covariance pass's captures (``methods.ekfac.replay``):
same factors and scores as a second pass, one model pass fewer, and a second pass when the
captures exceed the budget."""
import pytest
import torch

import attrkernels as ak
from attrkernels.capture.handlers.base import Handler, Record
from attrkernels.methods.ekfac.replay import BatchMemo, Budget, Replay, capture_bytes, default_budget
from attrkernels.methods.ekfac.spill import SpillFile

from test_ekfac import LAYERS, Loader, NetTask, make_net, net_data


class Counted(list):
    """A list of batches that counts the passes over it."""

    passes = 0

    def __iter__(self):
        type(self).passes += 1
        return super().__iter__()


def fitted(train, **kw):
    model, task = make_net(), NetTask()
    m = ak.EKFAC(model, task, verbose=False, **kw).fit(train)
    return m, m.score(net_data(6, 9), train=train)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_replayed_correction_equals_a_second_pass_and_saves_it(fisher):
    data = net_data(24, 4)
    counts = {}
    results = {}
    for name, budget in (("second pass", 0), ("replay", None), ("over budget", 1000)):
        Counted.passes = 0
        results[name] = fitted(Counted(data), replay_budget=budget, fisher=fisher)
        counts[name] = Counted.passes
    assert counts["replay"] == counts["second pass"] - 1 == counts["over budget"] - 1
    (m0, s0) = results["second pass"]
    for name in ("replay", "over budget"):
        m, s = results[name]
        for layer in LAYERS:
            assert torch.equal(m.factors[0][layer].lam, m0.factors[0][layer].lam), (name, layer)
        assert torch.equal(s, s0), name
    assert m0.passes.replay is None and results["replay"][0].passes.replay is None  # nothing kept after fit


def test_kfac_keeps_no_captures_and_the_budget_is_checked():
    model, task = make_net(), NetTask()
    m = ak.KFAC(model, task, verbose=False).fit(net_data(16, 4))
    assert m.passes.replay is None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="replay_budget"):
            ak.EKFAC(model, task, replay_budget=bad)


def test_replay_counts_each_storage_once_and_keeps_the_prefix_of_batches_that_fits():
    class H:
        def __init__(self, records):
            self.records = records

    class R:
        def __init__(self, inputs, grad_out):
            self.inputs, self.grad_out = inputs, grad_out

    x = torch.zeros(10, 4)
    handlers = {"a": H([R(x, x[:5]), R(x[1:], None)]), "b": H([R(torch.zeros(3), torch.zeros(2))])}
    assert capture_bytes(handlers) == 4 * (40 + 3 + 2)
    keep = Replay(0, None, 300)
    keep.add(10, handlers, 0)
    assert keep.serves(0, None) and not keep.serves(1, None) and not keep.serves(0, (0, 10))
    other = {"a": H([R(torch.zeros(10, 4), None)])}
    keep.add(10, other, 10)  # 160 more bytes: beyond the budget, so keeping stops here
    keep.add(10, {"a": H([R(torch.zeros(1), None)])}, 20)  # would fit, but batches are kept in order
    assert keep.serves(0, None) and not keep.complete and keep.starts == [0] and keep.end == 10
    assert keep.bytes == keep.budget.used == 180
    assert not Replay(0, None, 0).serves(0, None)
    # a second Replay on the same budget gives way when that makes room, and stops with the first
    held = Replay(0, None, 300)
    keep = Replay(0, None, held.budget, yields=held)
    held.add(10, other, 0)
    memo = BatchMemo()
    keep.add(10, handlers, 0, memo)
    assert held.dropped and keep.budget.used == 180 and len(memo.counted) == 3
    held, memo = Replay(0, None, 400), BatchMemo()
    keep = Replay(0, None, held.budget, yields=held)
    keep.add(10, handlers, 0, memo)
    held.add(10, handlers, 0, memo)  # its storages are counted by keep already
    keep.add(10, {"a": H([R(torch.zeros(70), None)])}, 10, memo)  # 280 bytes: dropping held frees none
    assert len(memo.counted) == 3 and keep.starts == held.starts == [0] and not keep.accepting and not held.accepting
    assert default_budget(torch.device("cpu")) > 0


def test_batches_beyond_the_budget_go_to_the_spill_file_and_come_back_equal(tmp_path):
    x, g = torch.randn(10, 4), torch.randn(10, 3).double()
    handlers = {"a": Handler(torch.nn.Linear(4, 3)), "b": Handler(torch.nn.Linear(4, 3))}
    handlers["a"].records = [Record(inputs=x, grad_out=g[:, :2]), Record(inputs=x[1:], grad_out=g.T)]
    handlers["b"].records = [Record(inputs=x, grad_out=torch.zeros(0))]  # shares a's input storage
    handlers["a"].tied, handlers["b"].tied = [handlers["b"]], [handlers["a"]]
    spill = SpillFile(tmp_path, reserve=0)
    budget = Budget(200, spill)  # room for the first batch (160 + 80 bytes: no) in memory: nothing
    held = Replay(0, None, budget)
    keep = Replay(0, None, budget, yields=held)
    memo = BatchMemo()
    keep.add(10, handlers, 0, memo)
    held.add(10, handlers, 0, memo)  # the same tensors: written once
    assert keep.bytes == held.bytes == 0 and budget.used == 0 and not held.dropped
    assert spill.size == 4 * 40 + 8 * 20 + 4 * 36 + 8 * 30  # x once (for a and b), g[:, :2], x[1:], g.T
    small = {"a": Handler(torch.nn.Linear(1, 1))}
    small["a"].records = [Record(inputs=torch.ones(2), grad_out=torch.ones(1, dtype=torch.bfloat16))]
    keep.add(4, small, 10)
    assert keep.complete and keep.starts == [0, 10] and keep.end == 14
    assert [(start, size) for start, size, _ in keep.items()] == [(0, 10), (10, 4)]
    assert [(start, size) for start, size, _ in held.items()] == [(0, 10)]
    for r in (keep, held):
        got = next(r.items())[2]
        for name in handlers:
            for want, back in zip(handlers[name].records, got[name].records):
                for field in ("inputs", "grad_out"):
                    a, b = getattr(want, field), getattr(back, field)
                    assert a.dtype == b.dtype and torch.equal(a, b), (name, field)
        assert got["a"].tied == [got["b"]] and got["b"].tied == [got["a"]]  # relinked to the copies
    again = list(keep.items())[1][2]
    assert again["a"].records[0].grad_out.dtype == torch.bfloat16
    assert torch.equal(again["a"].records[0].grad_out, small["a"].records[0].grad_out)
    # a batch kept in memory moves to disk on request; a disk without room stops keeping
    mem = Replay(0, None, Budget(1 << 20, SpillFile(tmp_path, reserve=0)))
    mem.add(4, small, 0)
    assert mem.bytes > 0 and mem.to_disk_all() and mem.bytes == 0 == mem.budget.used
    assert torch.equal(next(mem.items())[2]["a"].records[0].inputs, torch.ones(2))
    full = Replay(0, None, Budget(0, SpillFile(tmp_path, reserve=1 << 62)))
    full.add(4, small, 0)
    assert full.dropped and not full.accepting
    with pytest.raises(ValueError, match="spill_dir"):
        SpillFile(tmp_path / "missing")


def test_spill_writes_run_behind_and_a_read_waits_for_its_write(tmp_path, monkeypatch):
    import threading

    import attrkernels.methods.ekfac.spill as spill_module

    release, pwrite = threading.Event(), spill_module.os.pwrite

    def slow(fd, data, offset):
        release.wait(5)
        return pwrite(fd, data, offset)

    monkeypatch.setattr(spill_module.os, "pwrite", slow)
    spill = SpillFile(tmp_path, reserve=0)
    x, y = torch.randn(64, 3), torch.arange(10.0).reshape(2, 5).T  # y: a transposed view
    rx, ry = spill.write(x), spill.write(y)  # both return before anything is in the file
    assert spill._waiting_bytes == x.numel() * 4 + y.numel() * 4
    threading.Timer(0.2, release.set).start()
    assert torch.equal(spill.read(ry), y) and torch.equal(spill.read(rx), x)
    assert spill._waiting_bytes == 0 and not spill._waiting
    release.clear()
    spill.write(x)
    threading.Timer(0.2, release.set).start()
    spill.flush()
    assert not spill._waiting
    spill.close()
    # at most ``behind`` bytes wait: with none, each write is in the file when write returns
    now = SpillFile(tmp_path, reserve=0, behind=0)
    now.write(x)
    assert not now._waiting
    with pytest.raises(ValueError, match="behind"):
        SpillFile(tmp_path, behind=-1)


def test_a_failed_spill_write_keeps_its_tensor_and_stops_keeping(tmp_path, monkeypatch):
    import attrkernels.methods.ekfac.spill as spill_module

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    spill = SpillFile(tmp_path, reserve=0, behind=1 << 30)
    ok = spill.write(torch.ones(4))
    spill.flush()
    monkeypatch.setattr(spill_module.os, "pwrite", full)
    lost = torch.randn(3, 2)
    ref = spill.write(lost)
    spill.flush()
    assert isinstance(spill.failure, OSError)
    assert torch.equal(spill.read(ref), lost)  # from memory: never in the file
    assert torch.equal(spill.read(ok), torch.ones(4))
    with pytest.raises(OSError, match="earlier write"):
        spill.write(torch.zeros(2))
    # a Replay whose spill file failed keeps no later batch
    small = {"a": Handler(torch.nn.Linear(1, 1))}
    small["a"].records = [Record(inputs=torch.ones(2), grad_out=torch.ones(1))]
    replay = Replay(0, None, Budget(0, spill))
    replay.add(2, small, 0)
    assert replay.dropped and not replay.accepting


class CountedNet(torch.nn.Module):
    """The test net, counting the examples its forward sees."""

    def __init__(self):
        super().__init__()
        self.net, self.examples = make_net(), 0

    def forward(self, inputs):
        self.examples += inputs[0].shape[0]
        return self.net(inputs)


@pytest.mark.parametrize("cls,fisher", [(ak.EKFAC, "true"), (ak.EKFAC, "empirical"), (ak.KFAC, "true")])
def test_scores_read_the_training_gradients_the_covariance_pass_kept(cls, fisher, tmp_path):
    train, test = net_data(24, 4), net_data(6, 9)
    # the reference: a store (factors kept on disk, for a later process) keeps nothing for the scores
    ref_model = CountedNet()
    ref = cls(ref_model, NetTask(), fisher=fisher, store=tmp_path / "store", verbose=False).fit(train)
    assert ref.passes.held == {}
    ref_model.examples = 0
    want = ref.score(test, train=train)
    model = CountedNet()
    m = cls(model, NetTask(), fisher=fisher, verbose=False).fit(train)
    assert list(m.passes.held) == [0]
    assert m.passes.rotated == {}  # the Embedding layer's rotated gradient is not kept dense
    model.examples = 0
    got = m.score(test, train=train)
    assert ref_model.examples - model.examples == 24  # no model pass over the training data
    assert torch.equal(got, want)
    # a loader whose batches do not line up with the kept ones: a model pass, the same scores
    model.examples = 0
    rebatched = net_data(24, 4, batch=6)
    torch.testing.assert_close(m.score(test, train=rebatched), want, rtol=1e-5, atol=1e-6)
    assert model.examples == 24 + 6


def test_kept_training_gradients_give_way_to_the_correction_within_the_budget():
    train = net_data(24, 4)
    probe = ak.EKFAC(make_net(), NetTask(), verbose=False)
    keep = []
    orig_probe = probe.passes.correction

    def seen_replay(*args, **kwargs):
        keep.append(probe.passes.replay.bytes)
        return orig_probe(*args, **kwargs)

    probe.passes.correction = seen_replay
    probe.fit(train)
    both = keep[0] + probe.passes.held[0].bytes  # the correction's captures and the scores' output-gradients
    m = ak.EKFAC(make_net(), NetTask(), replay_budget=both - 1, verbose=False)
    passes = []
    orig = m.passes.correction

    def counting(*args, **kwargs):
        passes.append(m.passes.replay is not None and not m.passes.replay.dropped)
        return orig(*args, **kwargs)

    m.passes.correction = counting
    m.fit(train)
    # the correction replayed every batch; the scores' captures stopped at the batch beyond the budget
    assert passes == [True] and m.passes.held[0].starts == [0, 8]
    torch.testing.assert_close(m.score(net_data(6, 9), train=train), probe.score(net_data(6, 9), train=train),
                               rtol=1e-5, atol=1e-6)


class SmoothedTask(NetTask):
    """Overrides loss (label smoothing) but inherits Classification.sampled_losses, whose
    with_loss value is the plain cross-entropy: the fit must notice and keep nothing."""

    def loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none", label_smoothing=0.2)


def test_a_task_whose_loss_differs_from_sampled_losses_keeps_no_training_gradients(tmp_path):
    train, test = net_data(24, 4), net_data(6, 9)
    m = ak.EKFAC(make_net(), SmoothedTask(), verbose=False).fit(train)
    assert m.passes.held == {}
    want = ak.EKFAC(make_net(), SmoothedTask(), store=tmp_path, verbose=False).fit(train).score(test, train=train)
    assert torch.equal(m.score(test, train=train), want)


DENSE = [f"{name}.{p}" for name in ("seq", "conv", "conv2", "head") for p in ("weight", "bias")]


def test_empirical_fisher_scores_read_the_rotated_gradients_the_correction_kept(tmp_path):
    # without the Embedding every layer's rotated gradient is dense: the correction keeps them
    train, test = net_data(24, 4), net_data(6, 9)
    ref = ak.EKFAC(make_net(), NetTask(), fisher="empirical", params=DENSE, store=tmp_path, verbose=False).fit(train)
    want, want_self = ref.score(test, train=train), ref.self_influence(train)
    assert ref.passes.rotated == {}
    model = CountedNet()
    m = ak.EKFAC(model, NetTask(), fisher="empirical", params=[f"net.{p}" for p in DENSE], verbose=False).fit(train)
    assert list(m.passes.rotated) == [0] and m.passes.held == {}  # the captures are released
    kept = m.passes.rotated[0]
    assert [size for size, _ in kept.batches] == [8, 8, 8] and kept.starts == [0, 8, 16]
    # the head (one position, 198 x 4 weight) keeps its rotated positions, 202 floats an example
    # instead of 792; the others their formed gradients
    positions = {name: {chunk.R is None for _, parts in kept.batches for chunk in parts[name]}
                 for name in ("net.seq", "net.conv", "net.conv2", "net.head")}
    assert positions == {"net.seq": {False}, "net.conv": {False}, "net.conv2": {False}, "net.head": {True}}
    head = [chunk for _, parts in kept.batches for chunk in parts["net.head"]]
    assert sum(c.a.numel() + c.d.numel() for c in head) == 24 * (198 + 4)
    model.examples = 0
    got = m.score(test, train=train)
    assert model.examples == 6 + 1  # the queries and the test loader's one-example probe
    assert set(m.query_modes.values()) == {"eigenbasis"}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.self_influence(train), want_self, rtol=1e-4, atol=1e-5)
    assert model.examples == 7
    # batches that do not line up: a model pass, the same scores
    torch.testing.assert_close(m.score(test, train=net_data(24, 4, batch=6)), want, rtol=1e-4, atol=1e-5)
    assert model.examples == 7 + 6 + 24
    # a loader yielding the training examples in another order is refused, not scored from the rotations
    from attrkernels.store import DataMismatch

    with pytest.raises(DataMismatch):
        m.score(test, train=train[::-1])


def test_rotations_kept_for_part_of_the_batches_serve_those_and_the_kept_captures_the_rest(tmp_path):
    train, test = net_data(24, 4), net_data(6, 9)
    ref = ak.EKFAC(make_net(), NetTask(), fisher="empirical", params=DENSE, store=tmp_path, verbose=False).fit(train)
    want, want_self = ref.score(test, train=train), ref.self_influence(train)
    full = ak.EKFAC(make_net(), NetTask(), fisher="empirical", params=DENSE, verbose=False)
    seen = []
    orig = full.passes.correction

    def captures(*args, **kwargs):
        seen.append(full.passes.replay.budget.used)
        return orig(*args, **kwargs)

    full.passes.correction = captures
    full.fit(train)
    one_batch = full.passes.rotated[0].bytes // 3
    model = CountedNet()
    m = ak.EKFAC(model, NetTask(), fisher="empirical", params=[f"net.{p}" for p in DENSE],
                 replay_budget=seen[0] + one_batch * 3 // 2, verbose=False).fit(train)
    assert m.passes.rotated[0].starts == [0] and m.passes.held[0].starts == [8, 16]  # batch 0's captures released
    model.examples = 0
    torch.testing.assert_close(m.score(test, train=train), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.self_influence(train), want_self, rtol=1e-4, atol=1e-5)
    assert model.examples == 6 + 1  # the queries and the test loader's probe: no training example


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_a_budget_for_part_of_the_pass_replays_those_batches_and_runs_the_model_on_the_rest(fisher, tmp_path):
    train, test = net_data(24, 4), net_data(6, 9)

    def fit(budget, store):
        model = CountedNet()
        m = ak.EKFAC(model, NetTask(), fisher=fisher, replay_budget=budget, store=tmp_path / store, verbose=False)
        seen = {}
        orig = m.passes.correction

        def correction(*args, **kwargs):
            replay = m.passes.replay
            seen.update(kept=[] if replay is None else replay.starts, bytes=0 if replay is None else replay.bytes)
            before = model.examples
            out = orig(*args, **kwargs)
            seen["model"] = model.examples - before
            return out

        m.passes.correction = correction
        return m.fit(train), seen

    full, seen_full = fit(None, "full")
    assert seen_full["kept"] == [0, 8, 16] and seen_full["model"] == 0
    ref, seen_ref = fit(0, "ref")
    assert seen_ref["kept"] == [] and seen_ref["model"] == 24
    part, seen = fit(seen_full["bytes"] // 3 * 3 // 2, "part")  # room for one batch and a half
    assert seen["kept"] == [0] and seen["model"] == 16
    for layer in LAYERS:
        assert torch.equal(part.factors[0][f"net.{layer}"].lam, ref.factors[0][f"net.{layer}"].lam), layer
    assert torch.equal(part.score(test, train=train), ref.score(test, train=train))


def test_a_loader_whose_batches_move_between_the_passes_is_refused_not_double_counted(tmp_path):
    data = net_data(24, 4)
    (tokens, image), labels = (torch.cat(parts) for parts in zip(*[b[0] for b in data])), torch.cat([b[1] for b in data])

    class Rebatching:
        """The same examples in the same order, in batches of ``size``."""

        size = 8

        def __iter__(self):
            s = self.size
            return iter([((tokens[i:i + s], image[i:i + s]), labels[i:i + s]) for i in range(0, 24, s)])

    def fit(budget, loader, store):
        m = ak.EKFAC(make_net(), NetTask(), fisher="empirical", replay_budget=budget, store=tmp_path / store,
                     verbose=False)
        kept = {}
        orig = m.passes.correction

        def correction(*args, **kwargs):
            kept.update(starts=m.passes.replay.starts, bytes=m.passes.replay.bytes)
            loader.size = 6  # the correction pass's batches: 0-5, 6-11, ...
            return orig(*args, **kwargs)

        m.passes.correction = correction
        m.fit(loader)
        return kept

    one_batch = fit(None, Rebatching(), "full")["bytes"] // 3
    with pytest.raises(RuntimeError, match="batches changed between the covariance and correction passes"):
        fit(one_batch * 3 // 2, Rebatching(), "part")  # batch 0-7 replayed; 6-11 would count 6 and 7 again


def test_what_the_fit_kept_gives_way_when_the_queries_would_not_fit_beside_it(monkeypatch, tmp_path):
    from attrkernels.methods.ekfac import method as ekfac_method

    train, test = net_data(24, 4), Loader(net_data(6, 9), 6)  # a test loader of known length
    want = ak.EKFAC(make_net(), NetTask(), fisher="empirical", params=DENSE, store=tmp_path, verbose=False) \
        .fit(train).score(test, train=train)
    for free, kept in ((1 << 40, True), (1000, False)):
        model = CountedNet()
        m = ak.EKFAC(model, NetTask(), fisher="empirical", params=[f"net.{p}" for p in DENSE], verbose=False).fit(train)
        assert list(m.passes.rotated) == [0]
        monkeypatch.setattr(ekfac_method, "available_memory", lambda device, free=free: free)
        model.examples = 0
        torch.testing.assert_close(m.score(test, train=train), want, rtol=1e-4, atol=1e-5)
        assert (list(m.passes.rotated) == [0]) == kept
        assert model.examples == 6 + 1 + (0 if kept else 24)  # released: a model pass over the training data


@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("budget", ["none in memory", "one batch in memory"])
def test_batches_spilled_to_disk_replace_the_model_passes_with_the_same_factors_and_scores(fisher, budget, tmp_path):
    from attrkernels.methods.ekfac import method as ekfac_method

    train, test = net_data(24, 4), Loader(net_data(6, 9), 6)
    ref = ak.EKFAC(make_net(), NetTask(), fisher=fisher, params=DENSE, replay_budget=0, store=tmp_path / "ref",
                   verbose=False)
    ref.fit(train)
    want, want_self = ref.score(test, train=train), ref.self_influence(train)
    full = ak.EKFAC(make_net(), NetTask(), fisher=fisher, params=DENSE, verbose=False)
    full.passes.correction = lambda *a, orig=full.passes.correction, **kw: (
        seen.append(full.passes.replay.bytes), orig(*a, **kw))[1]
    seen = []
    full.fit(train)
    memory = 0 if budget == "none in memory" else seen[0] // 3 * 3 // 2
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    model = CountedNet()
    m = ak.EKFAC(model, NetTask(), fisher=fisher, params=[f"net.{p}" for p in DENSE], replay_budget=memory,
                 spill_dir=spill_dir, verbose=False)
    m.passes.correction = lambda *a, orig=m.passes.correction, **kw: (
        seen.append(model.examples), orig(*a, **kw), seen.append(model.examples))[1]
    m.fit(train)
    assert seen[-1] == seen[-2]  # the correction ran no model
    assert list(spill_dir.iterdir()) == []  # the spill file has no name
    for layer in ("seq", "conv", "conv2", "head"):  # read back contiguous: sums in another order
        want_lam = ref.factors[0][layer].lam
        torch.testing.assert_close(m.factors[0][f"net.{layer}"].lam, want_lam, rtol=1e-5,
                                   atol=1e-7 * float(want_lam.abs().max()))
    # the scores read the rotated gradients the correction formed (empirical Fisher) or the captures
    kept = m.passes.rotated.get(0) if fisher == "empirical" else m.passes.held.get(0)
    assert kept is not None and kept.starts == [0, 8, 16]
    model.examples = 0
    torch.testing.assert_close(m.score(test, train=train), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.self_influence(train), want_self, rtol=1e-4, atol=1e-5)
    assert model.examples == 6 + 1  # the queries and the test loader's probe: no training example
    # queries that would not fit beside what is kept in memory move it to disk, not the model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ekfac_method, "available_memory", lambda device: 1000)
        torch.testing.assert_close(m.score(test, train=train), want, rtol=1e-4, atol=1e-5)
    assert model.examples == 2 * 6 + 1
    assert all(r.bytes == 0 for r in (m.passes.held.get(0), m.passes.rotated.get(0)) if r is not None)
    from attrkernels.store import DataMismatch

    with pytest.raises(DataMismatch):  # the spilled batches are not served to a loader in another order
        m.score(test, train=train[::-1])


def test_spill_dir_must_be_a_directory(tmp_path):
    with pytest.raises(ValueError, match="spill_dir"):
        ak.EKFAC(make_net(), NetTask(), spill_dir=tmp_path / "missing")


def test_a_sharded_fit_with_a_spill_dir_merges_to_the_one_process_factors(tmp_path):
    data = net_data(24, 4)
    (tokens, image), labels = (torch.cat(parts) for parts in zip(*[b[0] for b in data])), torch.cat([b[1] for b in data])

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return (tokens[i], image[i]), labels[i]

    train = torch.utils.data.DataLoader(Examples(), batch_size=8)
    ref = ak.EKFAC(make_net(), NetTask(), store=tmp_path / "ref", verbose=False).fit(train)
    (tmp_path / "spill").mkdir()
    for wave in range(2):  # covariances of both shards, then their corrections
        for i in range(2):
            m = ak.EKFAC(make_net(), NetTask(), store=tmp_path / "sharded", replay_budget=0,
                         spill_dir=tmp_path / "spill", verbose=False).fit(train, shard=(i, 2))
    assert m.complete
    for layer in LAYERS:
        want = ref.factors[0][layer].lam
        torch.testing.assert_close(m.factors[0][layer].lam, want, rtol=1e-5, atol=1e-7 * float(want.abs().max()))
