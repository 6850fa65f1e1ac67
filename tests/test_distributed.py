"""torch.distributed on the CPU: two gloo processes started by the test."""
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from sparsecode import distributed, metrics
from sparsecode.activations import ActivationStore
from sparsecode.data import load_dictionary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fn, world_size: int = 2, *args):
    """Run fn(rank, *args) in `world_size` processes set up as torchrun would."""
    port = _free_port()
    mp.start_processes(_entry, args=(fn, world_size, port, args), nprocs=world_size, join=True, start_method="spawn")


def _entry(rank, fn, world_size, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPARSECODE_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    group = distributed.setup("cpu")
    try:
        fn(group, *args)
    finally:
        distributed.teardown()


def test_parts_cover_every_item_once():
    for n in (0, 1, 5, 7, 100):
        for world in (1, 2, 3, 8):
            parts = [distributed.Group(r, world).part(n) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_without_a_launcher_the_group_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = distributed.setup()
    assert (group.rank, group.world_size, group.main) == (0, 1, True)
    t = torch.tensor([1.5, 2.0])
    assert group.sum(t) is t and group.gather("a") == ["a"] and group.max(3.0) == 3.0


def test_more_ranks_than_gpus_on_a_node_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"local rank 1 needs GPU 1, but this node has 1: start at most 1 "):
        distributed.setup("cuda")


def test_a_world_size_without_the_rest_of_the_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="RANK is set but|is not: start the job with torchrun"):
        distributed.setup("cpu")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(103, 6, generator=g, dtype=torch.float64) * 3 + 1
    codes = torch.randn(103, 9, generator=g, dtype=torch.float64) * (torch.rand(103, 9, generator=g) < 0.3)
    x_hat = x + 0.1 * torch.randn(103, 6, generator=g, dtype=torch.float64)
    return x, x_hat, codes


def _reduce_case(group, out_dir):
    x, x_hat, codes = _data()
    acc = metrics.MetricAccumulator(9)
    batches = list(range(0, 103, 10))
    for i, start in enumerate(batches):
        if group.mine(i):
            sl = slice(start, start + 10)
            acc.update(x[sl], x_hat[sl], codes[sl], objective=(x[sl] ** 2).sum(1))
    (total,) = distributed.reduce_accumulators(group, [acc])
    summed = group.sum(torch.tensor([float(group.rank + 1)]))
    with open(os.path.join(out_dir, f"rank{group.rank}.json"), "w") as f:
        json.dump({"result": total.result(), "sum": float(summed), "max": group.max(float(group.rank))}, f)


def test_two_processes_reduce_metrics_to_the_one_process_numbers(tmp_path):
    _launch(_reduce_case, 2, str(tmp_path))
    x, x_hat, codes = _data()
    one = metrics.MetricAccumulator(9)
    one.update(x, x_hat, codes, objective=(x ** 2).sum(1))
    expected = one.result()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sum"] == 3.0 and got["max"] == 1.0
        assert got["result"].keys() == expected.keys()
        for key, value in expected.items():
            assert got["result"][key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def _failing_case(group):
    if group.rank == 1:
        raise ValueError("rank 1 failed on purpose")
    group.barrier()                 # rank 0 waits for a rank that is gone


def test_a_failing_rank_stops_the_job_instead_of_hanging():
    # rank 0 waits in a collective for rank 1, which raised: the job ends with an error (rank 1's, or
    # rank 0's lost connection to it, whichever the launcher sees first), well before the timeout
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException) as err:
        _launch(_failing_case, 2)
    assert time.monotonic() - start < 55
    assert "rank 1 failed on purpose" in str(err.value) or "Connection" in str(err.value)


# --- the commands' work on two ranks equals one process's -------------------------------------

COMPARED = ["fista", "omp"]


def _problem(folder):
    """Synthetic signals (a non-zero mean, so FVU's mean matters) in a store of 70-token shards."""
    import sparsecode as sc
    from sparsecode.activations import write_store
    data = sc.synthetic.make_sparse_data(n_samples=300, d=24, n_atoms=48, k=3, noise=0.02, seed=3)
    store = write_store(folder / "store", data.x + 0.5, 70)
    data.dictionary.save(folder / "dictionary.safetensors")
    return data.x + 0.5, data.dictionary, store


def _compare_on_store(store, dictionary):
    import sparsecode as sc
    # batches of 64 over shards of 70: the ranks' runs of batches cut through shards
    return sc.compare(COMPARED, store, dictionary, k=3, lam=0.05, reference="fista", batch_size=64,
                      device="cpu").rows


def _train(x):
    import sparsecode as sc
    enc = sc.get_encoder("topk", k=3, steps=25, batch_size=60, seed=1)
    return enc, enc.learn(x.double(), 48)


def _train_streamed(store):
    """topk trained on the store itself (streamed), and the token ranges this process read."""
    import sparsecode as sc
    from sparsecode.activations import ActivationStore
    read, original = [], ActivationStore.batches

    def spy(self, batch_size=4096, **kw):
        read.append((kw.get("start", 0), kw.get("max_tokens")))
        return original(self, batch_size, **kw)
    ActivationStore.batches = spy
    try:
        enc = sc.get_encoder("topk", k=3, steps=12, batch_size=64, seed=1)
        learned = enc.learn(store, 48)
    finally:
        ActivationStore.batches = original
    return enc, learned, sorted(set(read))


#: The training's lanes over the store's 300 tokens: 4 of 38 tokens, then 4 of 37.
LANE_STARTS = [38 * s - max(0, s - 4) for s in range(8)]


def _lane_starts(read) -> list[int]:
    """Where the lanes that were read start (reads of fewer than 100 tokens: not the initial sample)."""
    return sorted(start for start, n in read if n is not None and n < 100)


def _data_parallel_case(group, folder):
    import contextlib
    import io
    from pathlib import Path

    from sparsecode.activations import ActivationStore
    from sparsecode.cli import app
    from sparsecode.data import load_dictionary
    folder = Path(folder)
    store, dictionary = ActivationStore(folder / "store"), load_dictionary(str(folder / "dictionary.safetensors"))
    x = store.load().x
    rows = _compare_on_store(store, dictionary)
    enc, learned = _train(x)
    streamed, streamed_learned, read = _train_streamed(store)
    _io_write(folder / f"rank{group.rank}.json", {"rows": rows, "losses": enc.losses,
                                                  "atoms": learned.atoms.tolist(), "bias": learned.bias.tolist(),
                                                  "streamed_losses": streamed.losses,
                                                  "streamed_atoms": streamed_learned.atoms.tolist(), "read": read})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        app(["compare", "--encoders", "fista,omp", "--data", f"activations:{folder / 'store'}", "--dictionary",
             str(folder / "dictionary.safetensors"), "--n-train", "40", "--n-samples", "260", "--k", "3",
             "--out", str(folder / "cli.json")], standalone_mode=False)
    (folder / f"printed{group.rank}.txt").write_text(printed.getvalue())


def _io_write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def _both_cases(group, folder):
    _data_parallel_case(group, folder)
    _parallel_training_case(group, os.path.join(folder, "training"))
    _parallel_alternating_case(group, os.path.join(folder, "sparse-coding"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process job (starting processes is most of the cost) for the tests of what ranks compute."""
    folder = tmp_path_factory.mktemp("two-ranks")
    _problem(folder)
    (folder / "training").mkdir()
    (folder / "sparse-coding").mkdir()
    _launch(_both_cases, 2, str(folder))
    return folder


def test_two_ranks_compare_over_a_store_and_train_like_one_process(two_ranks):
    tmp_path = two_ranks
    x, dictionary = ActivationStore(tmp_path / "store").load().x, load_dictionary(str(tmp_path / "dictionary.safetensors"))
    store = ActivationStore(tmp_path / "store")
    expected = _compare_on_store(store, dictionary)
    enc, learned = _train(x)
    streamed, streamed_learned, one_read = _train_streamed(store)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["encoder"] for r in got["rows"]] == COMPARED
        for row, one in zip(got["rows"], expected):
            for key, value in one.items():
                if key in ("encode_s", "signals_per_s", "fit_s"):
                    continue
                if isinstance(value, float):
                    assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (row["encoder"], key)
                else:
                    assert row[key] == value, (row["encoder"], key)
        # the global batch's gradient, summed from the ranks' parts: the same path, in float64
        assert got["losses"] == pytest.approx(enc.losses, rel=1e-9)
        torch.testing.assert_close(torch.tensor(got["atoms"], dtype=torch.float64), learned.atoms,
                                   rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.tensor(got["bias"], dtype=torch.float64), learned.bias,
                                   rtol=1e-9, atol=1e-12)
        # streamed from the store: each rank reads only its own lanes (4 of the 8 of 300 / 8 tokens,
        # besides the sample that initialises the encoder), and the training is the one process's
        assert got["streamed_losses"] == pytest.approx(streamed.losses, rel=1e-5)
        torch.testing.assert_close(torch.tensor(got["streamed_atoms"]), streamed_learned.atoms, rtol=1e-5, atol=1e-6)
        assert _lane_starts(got["read"]) == LANE_STARTS[4 * rank:4 * rank + 4]
    assert _lane_starts(one_read) == LANE_STARTS
    # one results file, written by rank 0; only rank 0 prints
    saved = json.loads((tmp_path / "cli.json").read_text())
    assert [r["encoder"] for r in saved["rows"]] == ["fista", "omp"]
    assert "saved" in (tmp_path / "printed0.txt").read_text() and "omp" in (tmp_path / "printed0.txt").read_text()
    assert (tmp_path / "printed1.txt").read_text() == ""


EXTRACT = dict(layer=1, context_length=16, batch_size=4, n_tokens=290, shard_tokens=100)


def _extract_case(group, model_folder, corpus, out):
    from sparsecode import activations as act
    loaded = act.load_model(model_folder, device="cpu")
    name, docs = act.read_corpus(corpus)
    cfg = act.ExtractConfig(**EXTRACT)
    try:                            # every rank is killed after its first shard
        act.extract(loaded, name, docs, out, cfg, _stop_after_shards=1)
        raise AssertionError("the extraction was not interrupted")
    except KeyboardInterrupt:
        pass
    stats = act.extract(loaded, name, docs, out, cfg)
    _io_write(f"{out}-rank{group.rank}.json", {"tokens": stats.tokens, "resumed_from": stats.resumed_from})


@pytest.mark.slow
def test_two_ranks_extract_the_one_process_tokens_and_resume_rank_by_rank(tmp_path):
    make_tiny_llama = pytest.importorskip("test_activations").make_tiny_llama
    from sparsecode import activations as act
    folder, corpus = make_tiny_llama(tmp_path / "tiny-llama")
    _launch(_extract_case, 2, str(folder), str(corpus), str(tmp_path / "two"))
    loaded = act.load_model(str(folder), device="cpu")
    name, docs = act.read_corpus(str(corpus))
    act.extract(loaded, name, docs, tmp_path / "one", act.ExtractConfig(**EXTRACT))
    one, two = act.ActivationStore(tmp_path / "one"), act.ActivationStore(tmp_path / "two")
    assert two.n_tokens == one.n_tokens == 290
    # 15 tokens per sequence: the budget needs 20 sequences, 10 per rank, the last one cut to 5 tokens
    ranks = two.manifest["ranks"]
    assert [r["sequences"] for r in ranks] == [[0, 10], [10, 20]]
    assert all(f.startswith(f"shard-r{r['rank']:02d}-") for r in ranks for f in r["shards"])
    per_rank = [json.loads((tmp_path / f"two-rank{r}.json").read_text()) for r in range(2)]
    assert [p["resumed_from"] for p in per_rank] == [120, 120]          # one 2-batch shard each survived
    assert [p["tokens"] + p["resumed_from"] for p in per_rank] == [150, 140]
    # the same rows in the same order (shards in rank order); batches of other sizes may round differently
    torch.testing.assert_close(two.load().x, one.load().x, rtol=1e-5, atol=1e-6)



@pytest.mark.slow
def test_bench_ranks_runs_compare_and_training_under_torchrun_on_one_and_two_processes():
    from sparsecode.bench import ranks
    rows = ranks(2, n_tokens=8192 + 512, d=16, n_atoms=32, k=3, encoders=("omp",), train=("topk",), train_steps=5,
                 train_batch=256)
    assert [(r["work"], r["encoder"]) for r in rows] == [("compare", "omp"), ("train", "topk")]
    for row in rows:
        assert row["ranks"] == 2
        assert row["signals_per_s_1"] > 0 and row["signals_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["signals_per_s"] / row["signals_per_s_1"])
    with pytest.raises(ValueError, match="n_ranks"):
        ranks(1)


# --- resumable training checkpoints ------------------------------------------------------------

class _Stop(Exception):
    pass


def _stop_at(step):
    """A progress callback that interrupts training after `step` steps (as a kill would, later)."""
    def callback(what, done, total, loss):
        if done == step:
            raise _Stop(what)
    return callback


def _signals(n=90, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * (torch.rand(n, d, generator=g) < 0.5) + 0.3


def _learn(method, x, n_atoms=10, **params):
    import sparsecode as sc
    learned = sc.learn_dictionary(x, method.removesuffix("-warmup"), n_atoms, seed=2, **params)
    return learned.dictionary, learned.losses


CHECKPOINTED = [
    ("topk", dict(k=2, steps=11, batch_size=40, resample_every=2, checkpoint_every=3)),
    ("binary-entropy", dict(steps=11, batch_size=40, entropy=0.01, covariance=0.01, checkpoint_every=4)),
    # the penalties switch on after the resume point: the warm-up goes by the step, not by calls counted
    ("binary-entropy-warmup", dict(steps=11, batch_size=40, entropy=0.01, warmup=9, checkpoint_every=4)),
    ("binary-topk", dict(k=3, steps=11, batch_size=40, checkpoint_every=5)),
    ("sparse-coding", dict(inference="omp", k=2, n_iter=7, checkpoint_every=2)),
]


@pytest.mark.parametrize("method,params", CHECKPOINTED, ids=[m for m, _ in CHECKPOINTED])
def test_training_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, method, params):
    from sparsecode import checkpoint, training
    x = _signals()
    whole, whole_losses = _learn(method, x, **params)
    stem = tmp_path / "run-checkpoint"
    last = 5 if method == "sparse-coding" else 8         # after a checkpoint, before the end
    with checkpoint.checkpoints(stem):
        with training.progress(_stop_at(last)), pytest.raises(_Stop):
            _learn(method, x, **params)
        saved = json.loads((tmp_path / "run-checkpoint.json").read_text())
        every = params["checkpoint_every"]
        assert saved["step"] == last // every * every and saved["format"] == "sparsecode-checkpoint"
        torch.manual_seed(1234)          # the resumed process's own random state does not matter
        resumed, resumed_losses = _learn(method, x, **params)
    # exactly the uninterrupted run: same steps, same batches, same optimiser state
    assert resumed_losses == whole_losses
    assert torch.equal(resumed.atoms, whole.atoms)
    if whole.bias is not None:
        assert torch.equal(resumed.bias, whole.bias)
    assert not list(tmp_path.iterdir()), "the checkpoint is removed when training ends"


def test_a_streamed_training_resumes_at_its_place_in_the_store(tmp_path):
    import sparsecode as sc
    from sparsecode import checkpoint, training
    from sparsecode.activations import write_store
    store = write_store(tmp_path / "store", _signals(130).float(), 30)
    params = dict(k=2, steps=9, batch_size=50, checkpoint_every=4)        # 3 batches an epoch: epochs cross
    whole = sc.learn_dictionary(store, "topk", 10, **params)
    with checkpoint.checkpoints(tmp_path / "ckpt"):
        with training.progress(_stop_at(6)), pytest.raises(_Stop):
            sc.learn_dictionary(store, "topk", 10, **params)
        resumed = sc.learn_dictionary(store, "topk", 10, **params)
    assert resumed.losses == whole.losses
    assert torch.equal(resumed.dictionary.atoms, whole.dictionary.atoms)


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_field(tmp_path):
    from sparsecode import checkpoint, training
    x = _signals()
    params = dict(k=2, steps=8, batch_size=40, checkpoint_every=2)
    with checkpoint.checkpoints(tmp_path / "ckpt"):
        with training.progress(_stop_at(3)), pytest.raises(_Stop):
            _learn("topk", x, **params)
        with pytest.raises(ValueError, match=r"ckpt.json is a checkpoint of another training: config.k is 2 there "
                                             r"and 3 here"):
            _learn("topk", x, **{**params, "k": 3})
        with pytest.raises(ValueError, match=r"data.sum is"):
            _learn("topk", x + 1, **params)
        # how often it checkpoints does not change the result: resuming with another value is fine
        _learn("topk", x, **{**params, "checkpoint_every": 5})
    assert not (tmp_path / "ckpt.json").exists()
    (tmp_path / "ckpt.json").write_text('{"not": "ours"}')
    with pytest.raises(FileExistsError, match="not a sparsecode checkpoint"):
        with checkpoint.checkpoints(tmp_path / "ckpt"):
            pass


def test_by_default_a_checkpoint_is_written_after_a_time_without_one(tmp_path, monkeypatch):
    from sparsecode import checkpoint, training
    monkeypatch.setattr(checkpoint, "EVERY_S", 0.0)        # every step is "10 minutes" after the last one
    x = _signals()
    params = dict(k=2, steps=8, batch_size=40)
    whole, whole_losses = _learn("topk", x, **params)
    with checkpoint.checkpoints(tmp_path / "ckpt"):
        with training.progress(_stop_at(3)), pytest.raises(_Stop):
            _learn("topk", x, **params)
        assert json.loads((tmp_path / "ckpt.json").read_text())["step"] == 3
        resumed, resumed_losses = _learn("topk", x, **params)
    assert resumed_losses == whole_losses and torch.equal(resumed.atoms, whole.atoms)


def test_a_shared_dictionary_encoder_resumes_only_on_the_same_dictionary(tmp_path):
    import sparsecode as sc
    from sparsecode import checkpoint, training
    data = sc.synthetic.make_sparse_data(n_samples=80, d=8, n_atoms=12, k=2, seed=1)
    other = sc.synthetic.make_sparse_data(n_samples=80, d=8, n_atoms=12, k=2, seed=2).dictionary

    def fit(dictionary):
        return sc.get_encoder("relu", steps=6, batch_size=30, checkpoint_every=2).fit(dictionary, data.x)

    with checkpoint.checkpoints(tmp_path / "relu"):
        with training.progress(_stop_at(3)), pytest.raises(_Stop):
            fit(data.dictionary)
        with pytest.raises(ValueError, match="dictionary.sum is"):
            fit(other)


def test_lista_training_resumes_from_its_checkpoint(tmp_path):
    import sparsecode as sc
    from sparsecode import checkpoint, training
    data = sc.synthetic.make_sparse_data(n_samples=80, d=8, n_atoms=12, k=2, seed=1)

    def fit():
        enc = sc.get_encoder("lista", lam=0.05, unroll=3, steps=9, batch_size=30, checkpoint_every=2)
        return enc.fit(data.dictionary, data.x.double())

    whole = fit()
    with checkpoint.checkpoints(tmp_path / "lista"):
        with training.progress(_stop_at(5)), pytest.raises(_Stop):
            fit()
        resumed = fit()
    assert resumed.losses == whole.losses
    for name, tensor in whole.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[name], tensor), name


def test_train_command_checkpoint_options(tmp_path):
    from typer.testing import CliRunner

    from sparsecode.cli import app
    base = ["train", "--n-atoms", "8", "--k", "3", "--n-samples", "100", "--out", str(tmp_path / "sae")]
    result = CliRunner().invoke(app, base + ["--method", "sklearn", "--checkpoint-every", "3"])
    assert result.exit_code == 2 and "cannot checkpoint" in result.output
    result = CliRunner().invoke(app, base + ["--set", "topk.steps=20", "--checkpoint-every", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae-encoder.json", "sae-encoder.safetensors",
                                                         "sae.json", "sae.safetensors"]


@pytest.mark.slow
def test_a_killed_train_command_resumes_when_run_again(tmp_path):
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file
    args = ["--n-atoms", "12", "--k", "3", "--d", "8", "--n-samples", "400", "--set", "topk.steps=4000",
            "--set", "topk.batch_size=64", "--checkpoint-every", "50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(out, stdout=subprocess.PIPE):
        return subprocess.Popen([sys.executable, "-m", "sparsecode", "train", *args, "--out", str(out)], env=env,
                                stdout=stdout, stderr=subprocess.STDOUT, text=True)

    whole = train(tmp_path / "whole")
    assert whole.communicate(timeout=300)[0] is not None and whole.returncode == 0
    run = train(tmp_path / "cut", stdout=subprocess.DEVNULL)
    checkpoint_file = tmp_path / "cut-checkpoint.json"
    deadline = time.monotonic() + 240
    while not checkpoint_file.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    assert run.poll() is None, "training ended before it could be killed"
    time.sleep(0.5)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert checkpoint_file.exists() and not (tmp_path / "cut.json").exists()
    resumed = train(tmp_path / "cut")
    printed = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, printed
    assert "resuming from" in printed
    assert not checkpoint_file.exists()
    for name in ("", "-encoder"):
        whole, cut = (load_file(str(tmp_path / f"{run_}{name}.safetensors")) for run_ in ("whole", "cut"))
        assert whole.keys() == cut.keys()
        for key in whole:
            assert torch.equal(whole[key], cut[key]), key


# --- exact data-parallel binary coders and dead-atom resampling, and checkpoints on ranks -------

PARALLEL = [
    ("binary-entropy", dict(steps=12, batch_size=41, entropy=0.05, covariance=0.02, checkpoint_every=5)),
    ("binary-topk", dict(k=3, steps=12, batch_size=41, checkpoint_every=5)),
    ("topk", dict(n_atoms=40, k=1, steps=12, batch_size=41, resample_every=3, checkpoint_every=5)),
]


def _parallel_training_case(group, folder):
    from pathlib import Path

    from sparsecode import checkpoint, training
    folder = Path(folder)
    x = _signals(97)
    out = {}
    for method, params in PARALLEL:
        dictionary, losses = _learn(method, x, **params)
        with checkpoint.checkpoints(folder / f"{method}-ckpt"):
            try:
                with training.progress(_stop_at(7)):
                    _learn(method, x, **params)
            except _Stop:
                pass
            # only rank 0 wrote the checkpoint, and every rank resumes from it
            resumed, resumed_losses = _learn(method, x, **params)
        out[method] = {"atoms": dictionary.atoms.tolist(), "bias": dictionary.bias.tolist(), "losses": losses,
                       "resumed": resumed.atoms.tolist(), "resumed_losses": resumed_losses}
    _io_write(folder / f"rank{group.rank}.json", out)


def test_two_ranks_train_binary_coders_and_resample_dead_atoms_like_one_process(two_ranks):
    tmp_path = two_ranks / "training"
    x = _signals(97)
    for method, params in PARALLEL:
        dictionary, losses = _learn(method, x, **params)
        for rank in range(2):
            got = json.loads((tmp_path / f"rank{rank}.json").read_text())[method]
            # global batch statistics (all-reduced sums and counts): one process's path, in float64
            assert got["losses"] == pytest.approx(losses, rel=1e-9), method
            for key, expected in (("atoms", dictionary.atoms), ("bias", dictionary.bias)):
                torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64), expected,
                                           rtol=1e-9, atol=1e-12, msg=f"{method} {key}")
            assert got["resumed_losses"] == got["losses"], method
            assert got["resumed"] == got["atoms"], method
    assert not [p for p in tmp_path.iterdir() if "ckpt" in p.name]
    # the resampling case does resample (most of its 40 atoms die between checks)
    import sparsecode as sc
    params = dict(PARALLEL[-1][1])
    assert sc.learn_dictionary(x, "topk", params.pop("n_atoms"), seed=2, **params).encoder.resampled > 10


# --- alternating sparse coding on ranks: each encodes its part, the MOD sums are all-reduced ------

def _clustered(n=97, d=6, centres=3, noise=1e-4, seed=0):
    """Signals near 3 directions (scaled, plus noise below the 1e-3 that perturbs the initial atoms): the
    atoms drawn from one cluster compete, and with one atom a signal most of them go unused."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(centres, d, generator=g, dtype=torch.float64)
    scale = 1 + 0.5 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    return directions[torch.randint(centres, (n,), generator=g)] * scale + noise * torch.randn(
        n, d, generator=g, dtype=torch.float64)


#: (name, signals, n_atoms, options): each resamples unused atoms at some iterations, from worst signals
#: whose errors are far from ties (a tie within rounding may be broken either way: a near-exact fit,
#: as with more atoms than signals, makes every error a tie)
ALTERNATING = [
    ("fista", lambda: _signals(200, 8), 150, dict(inference="fista", lam=1.0, n_iter=7, checkpoint_every=2)),
    ("omp", _clustered, 24, dict(inference="omp", k=1, n_iter=7, checkpoint_every=2)),
]
ALTERNATING_CLI = ["train", "--method", "sparse-coding", "--set", "sparse-coding.inference=omp", "--set",
                   "sparse-coding.n_iter=4", "--n-atoms", "12", "--k", "2", "--d", "6", "--n-samples", "99"]


def _parallel_alternating_case(group, folder):
    import contextlib
    import io
    from pathlib import Path

    from sparsecode import checkpoint, training
    from sparsecode.cli import app
    folder = Path(folder)
    out = {}
    for name, signals, n_atoms, params in ALTERNATING:
        x = signals()
        dictionary, losses = _learn("sparse-coding", x, n_atoms, **params)
        with checkpoint.checkpoints(folder / f"{name}-ckpt"):
            try:
                with training.progress(_stop_at(5)):
                    _learn("sparse-coding", x, n_atoms, **params)
                raise AssertionError("the training was not interrupted")
            except _Stop:
                pass
            step = json.loads((folder / f"{name}-ckpt.json").read_text())["step"]
            resumed, resumed_losses = _learn("sparse-coding", x, n_atoms, **params)
        out[name] = {"atoms": dictionary.atoms.tolist(), "losses": losses, "checkpoint_step": step,
                     "resumed": resumed.atoms.tolist(), "resumed_losses": resumed_losses}
    _io_write(folder / f"rank{group.rank}.json", out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        app([*ALTERNATING_CLI, "--out", str(folder / "cli")], standalone_mode=False)
    (folder / f"printed{group.rank}.txt").write_text(printed.getvalue())


def test_two_ranks_learn_by_alternating_sparse_coding_like_one_process(two_ranks, tmp_path):
    from typer.testing import CliRunner

    from sparsecode.cli import app
    folder = two_ranks / "sparse-coding"
    for name, signals, n_atoms, params in ALTERNATING:
        x = signals()
        dictionary, losses = _learn("sparse-coding", x, n_atoms, **params)
        unresampled, _ = _learn("sparse-coding", x, n_atoms, **{**params, "resample": False})
        # unused atoms were resampled: the result is not the one without resampling
        assert not torch.allclose(unresampled.atoms, dictionary.atoms, atol=1e-3), name
        for rank in range(2):
            got = json.loads((folder / f"rank{rank}.json").read_text())[name]
            # MOD from the ranks' summed Z^T Z and Z^T X: one process's path, in float64
            assert got["losses"] == pytest.approx(losses, rel=1e-9), name
            torch.testing.assert_close(torch.tensor(got["atoms"], dtype=torch.float64), dictionary.atoms,
                                       rtol=1e-9, atol=1e-12, msg=name)
            # checkpointed by rank 0 after iteration 4, resumed on both ranks to the uninterrupted result
            assert got["checkpoint_step"] == 4
            assert got["resumed_losses"] == got["losses"], name
            assert got["resumed"] == got["atoms"], name
    assert not [p for p in folder.iterdir() if "ckpt" in p.name]
    # the command: rank 0 alone prints and writes the dictionary, which is one process's
    assert "saved dictionary" in (folder / "printed0.txt").read_text()
    assert (folder / "printed1.txt").read_text() == ""
    result = CliRunner().invoke(app, [*ALTERNATING_CLI, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    two, one = load_dictionary(str(folder / "cli.safetensors")), load_dictionary(str(tmp_path / "one.safetensors"))
    torch.testing.assert_close(two.atoms, one.atoms, rtol=1e-5, atol=1e-6)


def test_the_worst_rows_of_one_process_are_its_largest_errors():
    errors = torch.tensor([0.5, 3.0, 1.0, 2.0])
    rows = torch.arange(8.0).view(4, 2)
    picked, labels = distributed.Group().worst(3, errors, rows, torch.tensor([10, 11, 12, 13]))
    assert picked.tolist() == [[2.0, 3.0], [6.0, 7.0], [4.0, 5.0]] and labels.tolist() == [11, 13, 12]
    (everything,) = distributed.Group().worst(9, errors, rows)
    assert everything.shape == (4, 2)


def test_batch_statistics_outside_a_parallel_step_are_the_batch_s_own():
    from sparsecode.training import batch_mean, batch_rows
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    assert batch_mean(h).tolist() == [0.75, 0.75]
    assert batch_mean(h.T @ h / 4, rows=4).tolist() == [[0.75, 0.5], [0.5, 0.75]]
    assert batch_rows(4) == 4
