"""Your model, your data, your loss: every input form, loss and model form against a dense reference.

The reference for each case is computed here from the model called on the whole split at once
(``torch.func.functional_call`` + ``torch.func.hessian``), never through the Objective's batching,
weighting or output handling, in float64, with batch sizes that split the data unevenly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from flatscope.objective import Objective
from flatscope.params import ParamLayout
from flatscope.sources import H5Source, MapSource

from conftest import assert_one_line_error
import yourmodels as ym

HERE = Path(__file__).resolve().parent
REL = 1e-5


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))   # `yourmodels:NAME` as PYTHONPATH=tests would make it


def dense_reference(model, loss_of_outputs, inputs):
    """(loss, grad, Hessian) of ``loss_of_outputs(model(inputs))`` over the flat trainable parameters."""
    model = model.double()
    layout = ParamLayout.of(model)
    w = layout.flatten({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})

    def f(w):
        params = layout.unflatten(w)
        out = functional_call(model, params, inputs if isinstance(inputs, tuple) else (inputs,))
        return loss_of_outputs(out)

    from flatscope.objective import second_order_kernels

    with second_order_kernels():   # the reference needs a differentiable attention kernel too
        loss = f(w)
        g = torch.func.grad(f)(w)
        # reverse-over-reverse: torch.func.hessian (forward-over-reverse) returns an asymmetric
        # matrix through scaled_dot_product_attention on torch 2.13 (max |H - H^T| = 0.03 here)
        H = torch.func.jacrev(torch.func.grad(f))(w)
    assert torch.allclose(H, H.T, atol=1e-10)
    return float(loss), g, H, w


def check_against(obj, ref, *, rel=REL):
    loss, g, H, w = ref
    assert obj.dim == w.numel()
    assert torch.allclose(obj.w0, w)
    assert obj.loss() == pytest.approx(loss, rel=rel)
    og = obj.grad()
    assert torch.allclose(og, g, rtol=rel, atol=rel * float(g.abs().max()))
    V = torch.randn(3, obj.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    HV = obj.hvp(V)
    assert torch.allclose(HV, V @ H, rtol=rel, atol=rel * float((V @ H).abs().max()))
    op = obj.hvp_operator()
    assert torch.allclose(op(V), V @ H, rtol=rel, atol=rel * float((V @ H).abs().max()))


def test_images_keep_their_shape():
    torch.manual_seed(0)
    model = ym.TinyConv()
    X = torch.randn(7, 3, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    obj = Objective(model, X, y, loss="ce", batch_size=3, dtype=torch.float64)
    check_against(obj, dense_reference(model, lambda out: F.cross_entropy(out, y), X))


def test_token_transformer_next_token_loss_through_sdpa():
    """Integer token ids stay integer; the lm mean is over counted tokens, exact across batches of
    unequal token counts; second derivatives run through scaled_dot_product_attention."""
    torch.manual_seed(0)
    model = ym.TinyTransformer()
    ids = ym.token_data(10)
    labels = ids.clone()
    labels[::3, -3:] = -100
    obj = Objective(model, ids, labels, loss="lm", batch_size=4, dtype=torch.float64)
    assert obj.source.inputs.dtype == torch.int64

    def lm(out):
        return F.cross_entropy(out[:, :-1].reshape(-1, ym.VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)

    ref = dense_reference(model, lm, ids)
    check_against(obj, ref)
    with torch.no_grad():
        out = model.double()(ids)
    keep = labels[:, 1:] != -100
    acc = ((out[:, :-1].argmax(-1) == labels[:, 1:]) & keep).sum() / keep.sum()
    assert obj.evaluate()[1] == pytest.approx(float(acc), rel=1e-6)


def test_multidimensional_targets():
    torch.manual_seed(0)
    model = ym.TinyTransformer(classes=4)      # per-token labels (N, T) with ce
    ids = ym.token_data(9)
    tags = torch.randint(0, 4, ids.shape)
    obj = Objective(model, ids, tags, loss="ce", batch_size=4, dtype=torch.float64)
    check_against(obj, dense_reference(model, lambda o: F.cross_entropy(o.reshape(-1, 4), tags.reshape(-1)), ids))
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    X, Y = torch.randn(11, 4, dtype=torch.float64), torch.randn(11, 3, dtype=torch.float64)
    obj = Objective(model, X, Y, loss="mse", batch_size=4, dtype=torch.float64)
    check_against(obj, dense_reference(model, lambda o: F.mse_loss(o, Y), X))
    assert np.isnan(obj.evaluate()[1])


def test_streamed_dataset_equals_in_memory():
    torch.manual_seed(0)
    model = ym.TransformerKw()
    ds = ym.TokenDataset(13)
    streamed = Objective(model, data=MapSource(ds), loss="lm", batch_size=5, dtype=torch.float64)
    memory = Objective(model, {"input_ids": ds.ids}, ds.labels, loss="lm", batch_size=13, dtype=torch.float64)
    assert not streamed.source.in_memory
    assert streamed.loss() == pytest.approx(memory.loss(), rel=1e-12)
    assert torch.allclose(streamed.grad(), memory.grad(), rtol=1e-10, atol=1e-14)
    v = torch.randn(streamed.dim, dtype=torch.float64)
    assert torch.allclose(streamed.hvp(v), memory.hvp(v), rtol=1e-10, atol=1e-13)
    sub = streamed.subset([1, 4, 7])
    ref = Objective(model, {"input_ids": ds.ids[[1, 4, 7]]}, ds.labels[[1, 4, 7]], loss="lm", dtype=torch.float64)
    assert sub.loss() == pytest.approx(ref.loss(), rel=1e-12)
    x, y = streamed.minibatch(torch.tensor([2, 0]))
    assert torch.equal(x["input_ids"], ds.ids[[2, 0]]) and torch.equal(y, ds.labels[[2, 0]])


def test_h5_is_read_lazily_and_equals_memory(tmp_path):
    torch.manual_seed(0)
    model = ym.TinyConv()
    X = np.random.default_rng(0).standard_normal((23, 3, 5, 5)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 23)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("X", data=X, chunks=(4, 3, 5, 5))
        f["y"] = y
    src = H5Source(str(tmp_path / "d.h5"), "X", "y")
    reads = []
    orig = src._read
    src._read = lambda idx: (reads.append(len(idx)), orig(idx))[1]
    lazy = Objective(model, data=src, loss="ce", batch_size=6)
    mem = Objective(model, torch.from_numpy(X), torch.from_numpy(y), loss="ce", batch_size=6)
    assert lazy.loss() == pytest.approx(mem.loss(), rel=1e-6)
    assert max(reads) <= 6                       # never more than one batch in memory
    assert torch.allclose(lazy.grad(), mem.grad(), rtol=1e-5, atol=1e-7)
    x, t = src.take(torch.tensor([5, 2, 5]))
    assert torch.equal(x, torch.from_numpy(X[[5, 2, 5]])) and torch.equal(t, torch.from_numpy(y[[5, 2, 5]]))


def test_tuple_and_dict_outputs_and_output_key():
    torch.manual_seed(0)
    model = ym.Recurrent()
    ids = ym.token_data(8)
    y = torch.randint(0, 3, (8,))
    obj = Objective(model, ids, y, loss="ce", batch_size=3, dtype=torch.float64)   # tuple: first element
    check_against(obj, dense_reference(model, lambda o: F.cross_entropy(o[0], y), ids))    # LSTM + GRU HVPs
    model = ym.DictOut()
    feats = {"features": torch.randn(9, 4, dtype=torch.float64), "mask": torch.ones(9, 4, dtype=torch.float64)}
    y = torch.randint(0, 3, (9,))
    obj = Objective(model, feats, y, loss="ce", output="scores", batch_size=4, dtype=torch.float64)
    ref = dense_reference(model, lambda o: F.cross_entropy(o["scores"], y), (feats["features"], feats["mask"]))
    check_against(obj, ref)
    t = torch.randn(9, 1, dtype=torch.float64)
    aux = Objective(model, feats, t, loss="mse", output="aux", dtype=torch.float64)
    with torch.no_grad():
        expect = F.mse_loss(model.double()(**feats)["aux"], t)
    assert aux.loss() == pytest.approx(float(expect), rel=1e-12)


def test_frozen_parameters_excluded_tied_counted_once_and_0d_parameters():
    torch.manual_seed(0)
    model = ym.FrozenTied()
    ids = ym.token_data(7)
    obj = Objective(model, ids, ids, loss="lm", batch_size=3, dtype=torch.float64)
    names = obj.layout.names
    assert "frozen.weight" not in names and "out.weight" not in names and "emb.weight" in names
    assert "scale" in names and obj.layout.shapes[names.index("scale")] == ()
    assert obj.dim == ym.VOCAB * 4 + 1
    ref = dense_reference(model, lambda o: F.cross_entropy(o[:, :-1].reshape(-1, ym.VOCAB), ids[:, 1:].reshape(-1)),
                          ids)
    check_against(obj, ref)
    from flatscope.objective import exact_hessian

    assert torch.allclose(exact_hessian(obj), ref[2], rtol=1e-8, atol=1e-10)


def test_label_smoothing_ignore_index_bce_and_custom_loss_metric():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    y[3] = -100
    from flatscope.losses import CrossEntropy, make_metric

    obj = Objective(model, X, y, loss=CrossEntropy(0.1), batch_size=3, dtype=torch.float64)
    check_against(obj, dense_reference(model, lambda o: F.cross_entropy(o, y, label_smoothing=0.1), X))
    b = (torch.rand(10, 3, dtype=torch.float64) > 0.5).double()
    obj = Objective(model, X, b, loss="bce", batch_size=4, dtype=torch.float64)
    check_against(obj, dense_reference(model, lambda o: F.binary_cross_entropy_with_logits(o, b), X))
    y = torch.randint(0, 3, (10,))
    obj = Objective(model, X, y, loss=ym.mean_abs, metric=make_metric(ym.top2), batch_size=4, dtype=torch.float64)
    check_against(obj, dense_reference(model, lambda o: ym.mean_abs(o, y), X))
    with torch.no_grad():
        assert obj.evaluate()[1] == pytest.approx(float(ym.top2(model(X), y)), rel=1e-6)


class _NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward is itself a function without a backward: first derivatives only."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return _Opaque.apply(t, g)


class _Opaque(torch.autograd.Function):
    @staticmethod
    def forward(t, g):
        return g * (1 - t * t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for opaque_tanh_backward is not implemented")


class OnceDifferentiable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.b(_NoDoubleBackward.apply(self.a(x)))


def test_fd_hvp_within_its_measured_accuracy_and_auto_fallback():
    torch.manual_seed(0)
    X, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    exact = Objective(model, X, y, hvp_mode="exact", batch_size=7)
    fd = Objective(model, X, y, hvp_mode="fd", batch_size=7)
    rel = fd.fd_accuracy(samples=30)
    assert rel is not None and rel < 1e-2
    V = torch.randn(4, exact.dim, generator=torch.Generator().manual_seed(3))
    for v in V:
        e, a = exact.hvp(v), fd.hvp(v)
        assert float((e - a).norm() / e.norm()) < 10 * rel + 1e-3   # the same order as the measured accuracy
    # float64: the central difference is far more accurate
    fd64 = Objective(model, X, y, hvp_mode="fd", dtype=torch.float64)
    assert fd64.fd_accuracy() < 1e-6
    # a layer without double backward: auto falls back to fd and says so; exact fails loudly
    odd = Objective(OnceDifferentiable(), X, y, hvp_mode="auto")
    v = torch.randn(odd.dim)
    hv = odd.hvp(v)
    assert odd.hvp_info["mode"] == "fd" and any("fd" in n for n in odd.notes)
    ref = Objective(OnceDifferentiable().a.__class__(4, 6), X[:1], y[:1])  # noqa: F841 (construction only)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    plain.load_state_dict({"0.weight": odd.model.a.weight, "0.bias": odd.model.a.bias,
                           "2.weight": odd.model.b.weight, "2.bias": odd.model.b.bias})
    truth = Objective(plain, X, y, hvp_mode="exact").hvp(v)
    assert float((hv - truth).norm() / truth.norm()) < 1e-2
    with pytest.raises(RuntimeError, match="not implemented"):
        Objective(OnceDifferentiable(), X, y, hvp_mode="exact").hvp(v)


def test_hugging_face_gpt2_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from flatscope.checkpoint import load_checkpoint

    cfg = transformers.GPT2Config(vocab_size=ym.VOCAB, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    ck = load_checkpoint(str(tmp_path / "gpt2"))
    assert ck.kind == "hf"
    ids = ym.token_data(6)
    obj = Objective(ck.model, {"input_ids": ids}, ids, loss="lm", batch_size=4, dtype=torch.float64)
    unique = {p.data_ptr(): p.numel() for p in hf.parameters()}
    assert obj.dim == sum(unique.values())          # lm_head tied to wte: counted once
    hf = hf.double().eval()
    with torch.no_grad():
        # transformers upcasts the logits of its loss to float32
        assert obj.loss() == pytest.approx(float(hf(input_ids=ids, labels=ids).loss), rel=1e-6)
    v = torch.randn(obj.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = obj.hvp(v)
    fd = Objective(ck.model, {"input_ids": ids}, ids, loss="lm", hvp_mode="fd", dtype=torch.float64).hvp(v)
    assert float((hv - fd).norm() / hv.norm()) < 1e-6


# ---------------------------------------------------------------------------------------------- CLI
def _state_dict_checkpoint(tmp_path, model, name="model.pt"):
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


TRANSFORMER = ["--model", "yourmodels:transformer", "--data", "yourmodels:tokens", "--loss", "lm", "--batch-size", "8"]


def test_cli_every_analysis_on_a_token_transformer(cli, tmp_path):
    ck = _state_dict_checkpoint(tmp_path, ym.transformer())
    out = tmp_path / "r.h5"
    common = TRANSFORMER + ["-o", out, "--no-plot", "--json", "-q"]
    r = cli(["hessian", ck, "--top", "2", "--no-density", "--trace-probes", "4"] + common)
    assert r.exit_code == 0, r.stderr
    h = json.loads(r.stdout)
    assert h["lambda_max"] > 0 and len(h["residuals"]) == 2
    r = cli(["local-energy", ck, "--sigma", "0.01,0.1", "--samples", "4"] + common)
    assert r.exit_code == 0, r.stderr
    r = cli(["local-entropy", ck, "--gamma", "1000", "--steps", "20", "--burn-in", "5", "--chains", "2",
             "--minibatch", "full"] + common)
    assert r.exit_code == 0, r.stderr
    r = cli(["landscape", ck, "--grid", "3"] + common)
    assert r.exit_code == 0, r.stderr
    with h5py.File(out) as f:
        assert {"hessian", "local_energy", "local_entropy"} <= set(f) and any(k.startswith("landscape") for k in f)
    r = cli(["audit", ck, "--step", "hessian", "--set", "hessian.top=1", "--fail-if", "hessian.lambda_max > 1e9",
             "-o", tmp_path / "a.h5", "--json", "-q"] + TRANSFORMER)
    assert r.exit_code == 0, r.stderr
    r = cli(["train", "--model", "yourmodels:transformer", "--data", "yourmodels:tokens", "--loss", "lm",
             "--epochs", "2", "--batch-size", "8", "-o", tmp_path / "t.pt", "-q", "--json"])
    assert r.exit_code == 0, r.stderr
    r = cli(["info", tmp_path / "t.pt", "--model", "yourmodels:transformer", "--data", "yourmodels:tokens", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["test"]["accuracy"] >= 0


def test_cli_streamed_image_dataset_and_compare(cli, tmp_path):
    a = _state_dict_checkpoint(tmp_path, ym.conv(), "a.pt")
    torch.manual_seed(1)
    b = _state_dict_checkpoint(tmp_path, ym.TinyConv(), "b.pt")
    opts = ["--model", "yourmodels:conv", "--data", "yourmodels:images", "--loss", "ce", "--batch-size", "6"]
    r = cli(["hessian", a, "--top", "2", "--no-density", "--trace-probes", "4", "-o", tmp_path / "r.h5", "--no-plot",
             "--json", "-q", "--split", "test"] + opts)
    assert r.exit_code == 0, r.stderr
    r = cli(["compare", a, b, "--step", "hessian", "--set", "hessian.top=1", "-o", tmp_path / "cmp", "-q",
             "--json"] + opts)
    assert r.exit_code == 0, r.stderr
    r = cli(["hessian", a, "--top", "1", "--no-density", "--trace-probes", "2", "-o", tmp_path / "p.h5", "--no-plot",
             "-q", "--model", "yourmodels:conv", "--data", "yourmodels:image_pair", "--loss", "ce"])
    assert r.exit_code == 0, r.stderr


def test_cli_custom_loss_metric_and_hf_folder(cli, tmp_path):
    transformers = pytest.importorskip("transformers")
    ck = _state_dict_checkpoint(tmp_path, ym.conv())
    opts = ["--model", "yourmodels:conv", "--data", "yourmodels:images", "--no-plot", "-q", "--json"]
    r = cli(["local-energy", ck, "--sigma", "0.1", "--samples", "3", "--loss", "yourmodels:mean_abs", "--metric",
             "yourmodels:top2", "-o", tmp_path / "c.h5"] + opts)
    assert r.exit_code == 0, r.stderr
    cfg = transformers.GPT2Config(vocab_size=ym.VOCAB, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    np.savez(tmp_path / "tok.npz", X=ym.token_data(16).numpy(), y=ym.token_data(16).numpy())
    r = cli(["hessian", tmp_path / "gpt2", "--data", f"npz:{tmp_path / 'tok.npz'}", "--loss", "lm", "--top", "2",
             "--no-density", "--trace-probes", "2", "-o", tmp_path / "g.h5", "--no-plot", "-q", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["lambda_max"] > 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, contains", [
    (["--data", "yourmodels:not_data"], "returned int"),
    (["--data", "yourmodels:images"], "failed on batch 0"),             # images into a token model
    (["--loss", "ce"], "outputs [2, 6, 11] do not fit labels [2, 6]"),   # fine shapes: ce on per-token labels works
    (["--loss", "yourmodels:vector_loss"], "not a scalar"),
    (["--loss", "yourmodels:nan_loss"], "non-finite"),
    (["--output", "nope"], "single tensor"),
])
def test_bad_inputs_one_line_errors(cli, tmp_path, extra, contains):
    ck = _state_dict_checkpoint(tmp_path, ym.transformer())
    base = {"--model": "yourmodels:transformer", "--data": "yourmodels:tokens", "--loss": "lm"}
    for k, v in zip(extra[::2], extra[1::2]):
        base[k] = v
    args = ["hessian", ck, "--top", "1", "--no-density", "-o", tmp_path / "r.h5"] + [t for kv in base.items() for t in kv]
    r = cli(args)
    if contains.startswith("outputs"):
        assert r.exit_code == 0, r.stderr           # per-token ce is valid: (N, T, V) against (N, T)
        return
    assert_one_line_error(r, contains=contains)
    assert not (tmp_path / "r.h5").exists()


def test_bad_token_ids_labels_and_sequences(cli, tmp_path):
    ck = _state_dict_checkpoint(tmp_path, ym.transformer())
    ids = ym.token_data(8).numpy()
    big = ids.copy()
    big[5, 2] = 99
    np.savez(tmp_path / "big.npz", X=big, y=ids)
    r = cli(["hessian", ck, "--model", "yourmodels:transformer", "--data", f"npz:{tmp_path / 'big.npz'}", "--loss", "lm",
             "--top", "1", "--no-density", "--batch-size", "4", "-o", tmp_path / "r.h5"])
    line = assert_one_line_error(r, contains="batch 1")
    assert "index out of range" in line
    ck2 = _state_dict_checkpoint(tmp_path, ym.conv(), "c.pt")
    np.savez(tmp_path / "lab.npz", X=np.random.randn(6, 3, 5, 5).astype(np.float32), y=np.array([0, 1, 2, 7, 0, 1]))
    r = cli(["hessian", ck2, "--model", "yourmodels:conv", "--data", f"npz:{tmp_path / 'lab.npz'}", "--loss", "ce",
             "--top", "1", "-o", tmp_path / "r.h5"])
    assert_one_line_error(r, contains="labels go up to 7")
    r = cli(["hessian", ck2, "--model", "yourmodels:conv", "--data", "yourmodels:images", "--loss", "lm",
             "--top", "1", "-o", tmp_path / "r.h5"])
    assert_one_line_error(r, contains="token sequences")
    assert not (tmp_path / "r.h5").exists()


def test_bad_hugging_face_folders(cli, tmp_path):
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps({"model_type": "gpt2", "auto_map": {"AutoModel": "x.Y"}}))
    (tmp_path / "remote" / "model.safetensors").write_bytes(b"")
    r = cli(["info", tmp_path / "remote"])
    assert_one_line_error(r, contains="remote code")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=ym.VOCAB, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "pytorch_model.bin").exists() or (tmp_path / "pickled" / "model.safetensors").exists()
    if (tmp_path / "pickled" / "model.safetensors").exists():   # transformers 5 always writes safetensors
        (tmp_path / "pickled" / "model.safetensors").rename(tmp_path / "pickled" / "pytorch_model.bin")
    r = cli(["info", tmp_path / "pickled"])
    assert_one_line_error(r, contains="pickled")


def test_module_of_a_factory_is_found_on_the_path(tmp_path, monkeypatch, cli):
    """What the README promises: a module in the working directory (or on PYTHONPATH) is importable."""
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "def net():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mynet

    torch.save(mynet.net().state_dict(), tmp_path / "w.pt")
    r = cli(["info", "w.pt", "--model", "mynet:net", "--data", "digits", "--loss", "ce", "--json"])
    assert r.exit_code == 0, r.stderr
    sys.modules.pop("mynet", None)


def test_torchvision_model_and_state_dict(cli, tmp_path):
    torchvision = pytest.importorskip("torchvision")   # needs a torch build torchvision was compiled against
    from flatscope.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "torchvision:resnet18", "kwargs": {"num_classes": 3}})
    assert isinstance(model, torchvision.models.ResNet)
    X = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "img.npz", X=X, y=y)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    r = cli(["info", tmp_path / "r18.pt", "--model", "torchvision:resnet18", "--model-kwargs", '{"num_classes": 3}',
             "--data", f"npz:{tmp_path / 'img.npz'}", "--loss", "ce", "--json"])
    assert r.exit_code == 0, r.stderr
    with torch.no_grad():
        expect = F.cross_entropy(model.eval()(torch.from_numpy(X)), torch.from_numpy(y))
    assert json.loads(r.stdout)["metrics"]["train"]["loss"] == pytest.approx(float(expect), rel=1e-5)
    with pytest.raises(Exception, match="no model"):
        build_model({"name": "torchvision:not_a_net"})


def test_cli_sharpness_reports_a_custom_metric(cli, tmp_path):
    ck = _state_dict_checkpoint(tmp_path, ym.conv())
    opts = ["--model", "yourmodels:conv", "--data", "yourmodels:images", "--loss", "ce", "--rho", "0.5,2", "--steps",
            "5", "--samples", "4", "--no-plot", "-q", "--json"]
    plain = json.loads(cli(["sharpness", ck, "-o", tmp_path / "a.h5"] + opts).stdout)
    r = cli(["sharpness", ck, "--metric", "yourmodels:top2", "-o", tmp_path / "b.h5"] + opts)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert plain["worst"] == pytest.approx(out["worst"], rel=1e-6)   # the loss ascent is the same
    assert all(np.isnan(plain.get("worst_value") or [np.nan]))
    v = np.asarray(out["worst_value"], dtype=float)
    assert np.isfinite(v).all() and (np.abs(v) <= 1).all() and v[-1] < 0   # top-2 accuracy falls at rho = 2



def test_local_energy_error_is_one_minus_a_custom_metric(cli, tmp_path):
    """--metric replaces accuracy: the error column is 1 - metric, so --target (alias of --target-error)
    bisects the sigma at which the metric falls by EPS."""
    model = ym.conv()
    ck = _state_dict_checkpoint(tmp_path, model)
    opts = ["--model", "yourmodels:conv", "--data", "yourmodels:images", "--loss", "ce", "--sigma", "0.1",
            "--samples", "2", "--no-plot", "-q", "--json"]
    r = cli(["local-energy", ck, "--metric", "yourmodels:top2", "--target", "0.5", "-o", tmp_path / "b.h5"] + opts)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    d = ym.images()["train"]
    with torch.no_grad():
        top2 = float(ym.top2(model.eval()(d.x), d.y))
    assert out["base_error"] == pytest.approx(1 - top2, abs=1e-12)
    assert out["target"]["epsilon"] == 0.5


# ---------------------------------------------------------------------------------------------- more sources
def test_safetensors_checkpoint_with_tied_weights(cli, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = ym.FrozenTied()
    save_model(model, str(tmp_path / "w.safetensors"))   # stores the tied tensor once
    np.savez(tmp_path / "tok.npz", X=ym.token_data(8).numpy(), y=ym.token_data(8).numpy())
    from flatscope.checkpoint import load_checkpoint

    ck = load_checkpoint(str(tmp_path / "w.safetensors"), model_spec={"name": "yourmodels:FrozenTied"},
                         allow_import=True)
    assert ck.kind == "safetensors" and torch.equal(ck.model.out.weight, model.emb.weight)
    r = cli(["info", tmp_path / "w.safetensors", "--model", "yourmodels:FrozenTied", "--data",
             f"npz:{tmp_path / 'tok.npz'}", "--loss", "lm", "--json"])
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["n_frozen"] == 4 * 4 + 4 and info["n_trainable"] == ym.VOCAB * 4 + 1
    ids = ym.token_data(8)
    with torch.no_grad():
        out = model(ids)
    expect = F.cross_entropy(out[:, :-1].reshape(-1, ym.VOCAB), ids[:, 1:].reshape(-1))
    assert info["metrics"]["train"]["loss"] == pytest.approx(float(expect), rel=1e-6)


def test_hf_disk_dataset_equals_in_memory(tmp_path):
    datasets = pytest.importorskip("datasets")
    from flatscope.data import load_data

    ids = ym.token_data(10)
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": ids.tolist(), "text": ["x"] * 10}),
                              "test": datasets.Dataset.from_dict({"input_ids": ids[:4].tolist(), "text": ["y"] * 4})})
    d.save_to_disk(str(tmp_path / "corpus"))
    data = load_data({"name": f"hf-disk:{tmp_path / 'corpus'}"})
    assert len(data.train) == 10 and len(data.test) == 4
    torch.manual_seed(0)
    model = ym.TransformerKw()
    streamed = Objective(model, data=data.source("train"), loss="lm", batch_size=3, dtype=torch.float64)
    memory = Objective(model, {"input_ids": ids}, ids, loss="lm", dtype=torch.float64)
    assert streamed.loss() == pytest.approx(memory.loss(), rel=1e-12)      # string column dropped, ids as target
    with pytest.raises(Exception, match="no column"):
        load_data({"name": f"hf-disk:{tmp_path / 'corpus'}", "kwargs": {"columns": ["nope"]}})


def test_mnist1d_builtin_is_generated_locally():
    pytest.importorskip("mnist1d")
    from flatscope.data import load_data

    d = load_data({"name": "mnist1d", "kwargs": {"num_samples": 500}})
    assert d.X_train.shape == (400, 40) and d.X_test.shape == (100, 40) and d.n_outputs == 10
    again = load_data({"name": "mnist1d", "kwargs": {"num_samples": 500}})
    assert torch.equal(d.X_train, again.X_train)                            # seeded: the same data every time
    d.X_train[0, 0] += 1.0                             # generated once per process; each load its own copy
    assert not torch.equal(d.X_train, load_data({"name": "mnist1d", "kwargs": {"num_samples": 500}}).X_train)


def test_dataloaders_in_order_and_iterable_datasets():
    torch.manual_seed(0)
    model = ym.TinyConv()
    ds = ym.ImageDataset(11)
    ref = Objective(model, ds.x, ds.y, batch_size=11)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    assert Objective(model, loader, batch_size=4).loss() == pytest.approx(ref.loss(), rel=1e-6)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(ds.x, ds.y))

    it = Objective(model, torch.utils.data.DataLoader(Stream(), batch_size=5))
    assert it.n == 11 and it.loss() == pytest.approx(ref.loss(), rel=1e-6)
    with pytest.raises(Exception, match="no random access"):
        it.minibatch(torch.tensor([0, 1]))
    with pytest.raises(Exception, match="shuffle"):
        Objective(model, torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True))


def test_cli_hvp_fd_reports_its_accuracy_and_agrees_with_exact(cli, samples, tmp_path):
    common = ["--top", "2", "--no-density", "--trace-probes", "2", "--max-samples", "200", "--no-plot", "--json", "-q"]
    exact = json.loads(cli(["hessian", samples / "mlp-sgd.pt", "-o", tmp_path / "e.h5"] + common).stdout)
    r = cli(["hessian", samples / "mlp-sgd.pt", "--hvp", "fd", "-o", tmp_path / "f.h5"] + common)
    assert r.exit_code == 0, r.stderr
    fd = json.loads(r.stdout)
    assert fd["hvp"] == "fd" and exact["hvp"] == "cached"
    with h5py.File(tmp_path / "f.h5") as f:
        rel = json.loads(f["hessian"].attrs["summary"])["hvp_fd_rel_error"]
    # float32 model, float64 differences: before they were widened, float32 differences near this minimum
    # gave a probe error of 0.3 and a lambda_max 18x too large
    assert 0 < rel < 1e-4
    assert fd["lambda_max"] == pytest.approx(exact["lambda_max"], rel=1e-4)
    r = cli(["hessian", samples / "mlp-sgd.pt", "--hvp", "fd", "--dtype", "float64", "-o", tmp_path / "g.h5"] + common)
    fd64 = json.loads(r.stdout)
    with h5py.File(tmp_path / "g.h5") as f:
        rel64 = json.loads(f["hessian"].attrs["summary"])["hvp_fd_rel_error"]
    assert rel64 < 1e-6 and fd64["lambda_max"] == pytest.approx(exact["lambda_max"], rel=1e-4)


def test_cli_streamed_dataset_with_worker_processes(cli, tmp_path):
    ck = _state_dict_checkpoint(tmp_path, ym.conv())
    opts = ["--model", "yourmodels:conv", "--data", "yourmodels:images", "--loss", "ce", "--json"]
    one = json.loads(cli(["info", ck] + opts).stdout)["metrics"]
    two = json.loads(cli(["info", ck, "--workers", "2", "--batch-size", "4"] + opts).stdout)["metrics"]
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-6)
    assert two["test"]["accuracy"] == one["test"]["accuracy"]


def test_cnn1d_builtin_is_the_stated_network_and_its_hessian_is_exact():
    """``cnn1d`` (for mnist1d's 40-sample signals) equals its definition written with torch.nn.functional,
    takes (N, 40) and (N, 1, 40), refuses bad shapes, and its Lanczos lambda_max equals the dense Hessian's."""
    import torch.nn.functional as F

    from flatscope.analyses.hessian import top_eigenvectors
    from flatscope.errors import FlatscopeError
    from flatscope.models import build_model
    from flatscope.objective import exact_hessian

    torch.manual_seed(0)
    m = build_model({"name": "cnn1d", "kwargs": {"in_features": 12, "out_features": 3, "channels": [2, 3],
                                                 "hidden": 4, "kernel": 3}}).double()
    x = torch.randn(7, 12, dtype=torch.float64)
    c1, c2, l1, l2 = m.features[0], m.features[3], m.head[1], m.head[3]
    h = F.max_pool1d(F.relu(F.conv1d(x[:, None], c1.weight, c1.bias, padding=1)), 2)
    h = F.max_pool1d(F.relu(F.conv1d(h, c2.weight, c2.bias, padding=1)), 2)          # length 12 -> 3
    ref = F.linear(F.relu(F.linear(h.flatten(1), l1.weight, l1.bias)), l2.weight, l2.bias)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(m(x[:, None]), ref, rtol=0, atol=1e-12)
    for bad, match in (({"kernel": 4}, "odd kernel"), ({"in_features": 3}, "at least 4"),
                       ({"in_shape": [2, 5]}, "does not hold")):
        with pytest.raises(FlatscopeError, match=match):
            build_model({"name": "cnn1d", "kwargs": {"in_features": 12, **bad}})
    y = torch.randint(0, 3, (7,))
    obj = Objective(m, x, y, loss="ce", dtype=torch.float64)
    ev = torch.linalg.eigvalsh(exact_hessian(obj))
    lam = float(top_eigenvectors(obj, 1, seed=0).eigenvalues[0])
    assert lam == pytest.approx(float(ev[-1]), rel=1e-6)                     # Lanczos at tol 1e-5 on ~100 dims
