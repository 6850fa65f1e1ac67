"""Activation extraction, the sharded store, streaming, and splicing, on a tiny random Llama."""
import json
import string

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparsecode as sc  # noqa: E402
from sparsecode import _io, activations as act  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog. " * 6, "Sparse codes explain activations. " * 8,
        "Pack my box with five dozen liquor jugs! " * 7, "How vexingly quick daft zebras jump. " * 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def make_tiny_llama(folder):
    """A 3-layer Llama with random weights and a character tokenizer, saved as a local model folder
    (with a corpus.txt beside it)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *string.printable])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT))
    return folder, corpus


@pytest.fixture(scope="module")
def loaded(tiny):
    return act.load_model(str(tiny[0]), device="cpu")


CFG = dict(layer=1, context_length=16, batch_size=4, n_tokens=300, shard_tokens=100)


def test_resid_hook_equals_hidden_states(loaded):
    ids = act.token_sequences(loaded.tokenizer, TEXT, 16, bos=True)[:3]
    with torch.no_grad():
        ref = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
        with act.capture(loaded.model, 1, "resid", stop=False) as cap:
            loaded.model(input_ids=ids)
    torch.testing.assert_close(cap["x"], ref[2])
    assert ids[:, 0].eq(loaded.tokenizer.bos_token_id).all()


def test_mlp_hook_matches_a_manual_block_forward(loaded):
    model = loaded.model
    block = model.model.layers[1]
    ids = act.token_sequences(loaded.tokenizer, TEXT, 16, bos=True)[:2]
    seen = {}
    handle = block.self_attn.register_forward_hook(lambda m, a, out: seen.update(attn=out[0].detach()))
    with torch.no_grad(), act.capture(model, 1, "mlp", stop=False) as cap:
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    handle.remove()
    h = hidden[1]
    mid = h + seen["attn"]
    torch.testing.assert_close(cap["x"], block.post_attention_layernorm(mid))
    torch.testing.assert_close(cap["y"], block.mlp(cap["x"]))
    torch.testing.assert_close(hidden[2], mid + cap["y"])


def _reference_tokens(loaded, corpus, cfg, site="resid"):
    """The activations extract() should store, computed directly."""
    _, docs = act.read_corpus(str(corpus))
    rows = act.token_sequences(loaded.tokenizer, docs, cfg["context_length"], True)
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))]
    xs, ys = [], []
    with torch.no_grad(), act.capture(loaded.model, cfg["layer"], site, stop=False) as cap:
        for s in range(0, rows.shape[0], cfg["batch_size"]):
            loaded.model(input_ids=rows[s:s + cfg["batch_size"]])
            xs.append(cap["x"][:, 1:].reshape(-1, 32))
            if site == "mlp":
                ys.append(cap["y"][:, 1:].reshape(-1, 32))
    n = cfg["n_tokens"]
    return torch.cat(xs)[:n], (torch.cat(ys)[:n] if ys else None)


def test_store_round_trip_exact(tmp_path, tiny, loaded):
    folder, corpus = tiny
    name, docs = act.read_corpus(str(corpus))
    stats = act.extract(loaded, name, docs, tmp_path / "store", act.ExtractConfig(**CFG))
    assert stats.tokens == 300
    store = act.ActivationStore(tmp_path / "store")
    m = store.manifest
    assert m["n_tokens"] == 300 and m["d"] == 32 and m["layer"] == 1 and m["site"] == "resid"
    assert [s["n_tokens"] for s in m["shards"]] == [120, 120, 60]      # whole batches of 4 x 15 tokens
    assert m["revision"].startswith("files:")
    x_ref, _ = _reference_tokens(loaded, corpus, CFG)
    torch.testing.assert_close(store.load().x, x_ref, rtol=0, atol=0)
    # streaming: shuffled batches cover every token exactly once
    batches = list(store.batches(64, shuffle=True, seed=3, buffer_tokens=128))
    assert all(b.x.shape[0] == 64 and b.y is None for b in batches[:-1])
    streamed = torch.cat([b.x for b in batches])
    assert streamed.shape == x_ref.shape
    assert torch.equal(streamed[streamed[:, 0].argsort()], x_ref[x_ref[:, 0].argsort()])
    assert not torch.equal(streamed, x_ref)
    scale = act.compute_normalization(tmp_path / "store")
    normed = act.ActivationStore(tmp_path / "store").load(normalize=True).x
    assert float((normed ** 2).sum(1).mean()) == pytest.approx(1.0, rel=1e-5)
    assert act.ActivationStore(tmp_path / "store").manifest["normalization"]["scale"] == pytest.approx(scale)


def test_mlp_site_stores_pairs(tmp_path, tiny, loaded):
    folder, corpus = tiny
    name, docs = act.read_corpus(str(corpus))
    act.extract(loaded, name, docs, tmp_path / "mlp", act.ExtractConfig(**{**CFG, "site": "mlp"}))
    x, y = act.ActivationStore(tmp_path / "mlp").load(targets=True)
    x_ref, y_ref = _reference_tokens(loaded, corpus, CFG, site="mlp")
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_resume_after_interruption_equals_uninterrupted(tmp_path, tiny, loaded):
    folder, corpus = tiny
    name, docs = act.read_corpus(str(corpus))
    cfg = act.ExtractConfig(**CFG)
    act.extract(loaded, name, docs, tmp_path / "full", cfg)
    with pytest.raises(KeyboardInterrupt):
        act.extract(loaded, name, docs, tmp_path / "cut", cfg, _stop_after_shards=1)
    assert act.ActivationStore(tmp_path / "cut").n_tokens == 120
    stats = act.extract(loaded, name, docs, tmp_path / "cut", cfg)
    assert stats.resumed_from == 120 and stats.tokens == 180
    assert torch.equal(act.ActivationStore(tmp_path / "cut").load().x, act.ActivationStore(tmp_path / "full").load().x)


def test_refuses_to_mix_and_detects_broken_stores(tmp_path, tiny, loaded):
    folder, corpus = tiny
    name, docs = act.read_corpus(str(corpus))
    act.extract(loaded, name, docs, tmp_path / "s", act.ExtractConfig(**CFG))
    with pytest.raises(ValueError, match="refusing to mix.*'layer': \\(1, 2\\)"):
        act.extract(loaded, name, docs, tmp_path / "s", act.ExtractConfig(**{**CFG, "layer": 2}))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["shards"][1]["n_tokens"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard-00001.safetensors holds \\(120, 32\\) but the manifest says"):
        act.ActivationStore(tmp_path / "s")
    (tmp_path / "s" / "shard-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="missing|holds"):
        act.ActivationStore(tmp_path / "s")


def test_write_failure_keeps_complete_shards(tmp_path, tiny, loaded, monkeypatch):
    folder, corpus = tiny
    name, docs = act.read_corpus(str(corpus))
    real = _io.write_tensors
    calls = {"n": 0}

    def failing(path, tensors):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(path, tensors)

    monkeypatch.setattr(_io, "write_tensors", failing)
    with pytest.raises(OSError, match="No space left on device. The store keeps its 1 complete shards"):
        act.extract(loaded, name, docs, tmp_path / "s", act.ExtractConfig(**CFG))
    assert act.ActivationStore(tmp_path / "s").n_tokens == 120
    assert not list((tmp_path / "s").glob("*.tmp"))
    monkeypatch.setattr(_io, "write_tensors", real)
    act.extract(loaded, name, docs, tmp_path / "s", act.ExtractConfig(**CFG))
    x_ref, _ = _reference_tokens(loaded, corpus, CFG)
    assert torch.equal(act.ActivationStore(tmp_path / "s").load().x, x_ref)


class _Zero:
    def encode(self, x):
        return torch.zeros(x.shape[0], 32, dtype=x.dtype)


@pytest.mark.parametrize("site", ["resid", "mlp"])
def test_splicing_exact_and_zero(tiny, loaded, site):
    _, corpus = tiny
    _, docs = act.read_corpus(str(corpus))
    identity = sc.Dictionary(torch.eye(32))
    exact = sc.get_encoder("omp", k=32).fit(identity) if site == "resid" else None
    if site == "mlp":
        # a transcoder that is exactly the MLP: codes are the MLP output in the identity basis
        mlp = loaded.model.model.layers[1].mlp

        class Exact:
            def encode(self, x):     # the Llama MLP written out (calling mlp() here would re-enter the hook)
                return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        exact = Exact()
    kw = dict(layer=1, site=site, context_length=16, n_tokens=200, batch_size=4)
    res = act.evaluate(loaded, exact, identity, docs, **kw)
    assert abs(res.ce_spliced - res.ce_clean) < 1e-4
    assert res.ce_recovered == pytest.approx(1.0, abs=1e-3) and res.fvu < 1e-8
    zero = act.evaluate(loaded, _Zero(), identity, docs, **kw)
    assert zero.ce_spliced == pytest.approx(zero.ce_zero, abs=1e-6)
    if site == "mlp":
        # a skip-transcoder's direct term is spliced in too: here it alone is the whole MLP
        class SkipOnly(_Zero):
            skip_term = exact.encode
        direct = act.evaluate(loaded, SkipOnly(), identity, docs, **kw)
        assert abs(direct.ce_spliced - direct.ce_clean) < 1e-4 and direct.l0 == 0.0
    assert zero.ce_recovered == pytest.approx(0.0, abs=1e-6)
    assert zero.dead == 1.0 and zero.l0 == 0.0


def test_clear_errors(tmp_path, tiny, loaded):
    folder, corpus = tiny
    with pytest.raises(ValueError, match="cannot load model"):
        act.load_model(str(tmp_path / "no-such-model"), device="cpu")
    name, docs = act.read_corpus(str(corpus))
    with pytest.raises(ValueError, match="layer 7 is out of range: the model has 3 layers"):
        act.extract(loaded, name, docs, tmp_path / "s", act.ExtractConfig(**{**CFG, "layer": 7}))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        act.read_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "docs.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="has no field 'text'"):
        act.read_corpus(str(tmp_path / "docs.jsonl"))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        act.ActivationStore(tmp_path)


def test_cli_extract_compare_train_evaluate(tmp_path, tiny):
    from typer.testing import CliRunner
    from sparsecode.cli import app
    folder, corpus = tiny
    runner = CliRunner()
    store = tmp_path / "store"
    result = runner.invoke(app, ["extract", "--model", str(folder), "--corpus", str(corpus), "--layer", "1",
                                 "--context-length", "16", "--n-tokens", "400", "--shard-tokens", "128",
                                 "--out", str(store), "--device", "cpu", "--measure-overhead"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "stored 400 tokens" in said and "overhead" in said, said[-300:]
    result = runner.invoke(app, ["train", "--method", "topk", "--n-atoms", "48", "--set", "k=4", "--set", "steps=50",
                                 "--data", f"activations:{store}", "--n-samples", "300", "--out", str(tmp_path / "sae")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compare", "--encoders", f"{tmp_path / 'sae-encoder.safetensors'},omp,fista",
                                 "--k", "4", "--data", f"activations:{store}", "--n-train", "200", "--n-samples",
                                 "200", "--dictionary", str(tmp_path / "sae.safetensors")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "--dictionary", str(tmp_path / "sae.safetensors"), "--encoder",
                                 str(tmp_path / "sae-encoder.safetensors"), "--store", str(store), "--model",
                                 str(folder), "--corpus", str(corpus), "--n-tokens", "160", "--context-length", "16",
                                 "--histogram", str(tmp_path / "hist.png"), "--out", str(tmp_path / "eval.json"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["ce_zero"] > 0 and "ce_recovered" in ev and (tmp_path / "hist.png").stat().st_size > 5000
    result = runner.invoke(app, ["extract", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "cannot load model" in result.output


@pytest.mark.slow
def test_embedded_smollm2_extracts(tmp_path):
    pytest.importorskip("gguf")
    loaded = act.load_model(None, device="cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.model.config.hidden_size == 576
    name, docs = act.read_corpus(None)
    stats = act.extract(loaded, name, docs[:50], tmp_path / "s", act.ExtractConfig(layer=15, context_length=64,
                                                                                     n_tokens=300))
    store = act.ActivationStore(tmp_path / "s")
    assert store.n_tokens == 300 and store.d == 576 and stats.tokens == 300
    assert store.manifest["revision"].startswith("sha256:")
    assert torch.isfinite(store.load().x).all()
    # the converted folder the loads above came from holds the GGUF's tokens and weights exactly
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = act.embedded_model_file()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = act.token_sequences(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), docs[:3], 64, True)
    assert torch.equal(ids, act.token_sequences(loaded.tokenizer, docs[:3], 64, True))
    with torch.no_grad():
        assert torch.equal(direct(input_ids=ids[:2]).logits, loaded.model(input_ids=ids[:2]).logits)


def test_killed_before_the_first_manifest_resumes_and_foreign_folders_are_refused(tmp_path, tiny, loaded,
                                                                                   monkeypatch):
    folder, corpus = tiny
    name, docs = act.read_corpus(str(corpus))
    cfg = act.ExtractConfig(**CFG)
    # what a process killed between renaming its first shard and writing the manifest leaves behind
    act.extract(loaded, name, docs, tmp_path / "full", cfg)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "shard-00000.safetensors").write_bytes((tmp_path / "full" / "shard-00000.safetensors").read_bytes())
    (cut / ".shard-00001.safetensors.abc123.tmp").write_bytes(b"half a shard")
    stats = act.extract(loaded, name, docs, cut, cfg)
    assert stats.resumed_from == 0 and stats.tokens == 300
    assert torch.equal(act.ActivationStore(cut).load().x, act.ActivationStore(tmp_path / "full").load().x)
    # the manifest is written before the first shard, so an early kill leaves a recognisable store
    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(_io, "write_tensors", killed)
        with pytest.raises(KeyboardInterrupt):
            act.extract(loaded, name, docs, tmp_path / "early", cfg)
    assert act.ActivationStore(tmp_path / "early").n_tokens == 0
    assert act.extract(loaded, name, docs, tmp_path / "early", cfg).tokens == 300
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files other than a store's"):
        act.extract(loaded, name, docs, foreign, cfg)
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_store_files_keep_the_umask(tmp_path, tiny, loaded):
    import os
    folder, corpus = tiny
    name, docs = act.read_corpus(str(corpus))
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            act.extract(loaded, name, docs, tmp_path / f"s{mask:o}", act.ExtractConfig(**CFG))
        finally:
            os.umask(old)
        files = list((tmp_path / f"s{mask:o}").iterdir())
        assert len(files) == 4 and {f.stat().st_mode & 0o777 for f in files} == {mode}


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("shards"), "lacks 'shards'"),
    (lambda m: m.update(shards={"file": "x"}), "'shards' must be a list"),
    (lambda m: m["shards"][0].pop("n_tokens"), r"shards\[0\] lacks 'n_tokens'"),
])
def test_almost_right_manifests_are_named(tmp_path, tiny, loaded, edit, message):
    folder, corpus = tiny
    name, docs = act.read_corpus(str(corpus))
    act.extract(loaded, name, docs, tmp_path / "s", act.ExtractConfig(**CFG))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"manifest.json.*{message}"):
        act.ActivationStore(tmp_path / "s")


def test_embedded_model_is_converted_once_and_then_loads_the_same(tmp_path, tiny, monkeypatch, caplog):
    """The embedded GGUF is read once, kept as a plain model folder, and later loads give the same model."""
    import os
    from sparsecode.activations import model as model_module
    gguf = tmp_path / "package" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"stands for the GGUF file")
    monkeypatch.setattr(model_module, "embedded_model_file", lambda: gguf)
    monkeypatch.setenv("SPARSECODE_CACHE", str(tmp_path / "cache"))
    gguf_reads = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        def from_pretrained(klass, source, *args, _original=cls.from_pretrained.__func__, **kwargs):
            if "gguf_file" in kwargs:          # reading "the GGUF" means reading the tiny model here
                gguf_reads.append(kwargs.pop("gguf_file"))
                source = tiny[0]
            return _original(klass, source, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))
    old_mask = os.umask(0o027)
    try:
        first = act.load_model(None, device="cpu")
    finally:
        os.umask(old_mask)
    assert gguf_reads == ["model.gguf", "model.gguf"]
    (folder,) = (tmp_path / "cache" / "models").iterdir()       # no temporary folder left beside it
    assert folder.stat().st_mode & 0o777 == 0o750
    second = act.load_model(None, device="cpu")
    assert len(gguf_reads) == 2                                  # the second load reads the folder
    assert first.name == second.name == act.DEFAULT_MODEL and first.revision == second.revision
    ids = act.token_sequences(first.tokenizer, TEXT, 16, bos=True)[:2]
    assert torch.equal(ids, act.token_sequences(second.tokenizer, TEXT, 16, bos=True)[:2])
    with torch.no_grad():
        torch.testing.assert_close(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits,
                                   rtol=0, atol=0)
    # a cache that cannot be written costs time, not the run
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SPARSECODE_CACHE", str(blocked))
    with caplog.at_level("WARNING"):
        third = act.load_model(None, device="cpu")
    assert len(gguf_reads) == 4 and "cannot cache the converted model" in caplog.text
    assert third.revision == first.revision and blocked.read_text() == "not a folder"
