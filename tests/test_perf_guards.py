"""Correctness guards of the fast paths (no timing): each fast path computes what the straightforward one does."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from bertds.model import BertForPreTraining, get_config
from bertds.model.cpu_fastpath import Dropout, attention, unpadded_attention
from bertds.model.heads import MLMDecoder
from bertds.model.layers import BertSelfAttention, TokenLayout, key_padding_mask


def load_bench_script(name: str):
    """A bench/ script as a module, loaded from its file: bench/ is not an installed package."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference_bert = load_bench_script("reference_bert")
BERTModel, MultiHeadAttention = reference_bert.BERTModel, reference_bert.MultiHeadAttention
load_bertds_state_dict, pretraining_loss = reference_bert.load_bertds_state_dict, reference_bert.pretraining_loss
VOCAB = 300


def make_batch(batch=4, seq_len=24, preds=4, seed=0):
    """d2l-format batch: padded rows, prediction slots padded with position 0 and weight 0."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.tensor([24, 17, 9, 12])[:batch]
    tokens = torch.randint(5, VOCAB, (batch, seq_len), generator=g)
    tokens[torch.arange(seq_len)[None, :] >= valid[:, None]] = 1
    segments = (
        (torch.arange(seq_len)[None, :] >= valid[:, None] // 2) & (torch.arange(seq_len)[None, :] < valid[:, None])
    ).long()
    positions = torch.stack([torch.randperm(int(n) - 2, generator=g)[:preds] + 1 for n in valid])
    weights = torch.ones(batch, preds)
    weights[1, 3:] = 0
    weights[2, 1:] = 0
    positions[weights == 0] = 0
    labels = torch.randint(5, VOCAB, (batch, preds), generator=g) * weights.long()
    return {
        "tokens": tokens,
        "segments": segments,
        "valid_len": valid,
        "pred_positions": positions,
        "mlm_labels": labels,
        "mlm_weights": weights,
        "nsp_label": torch.tensor([1, 0, 1, 0])[:batch],
    }


def test_sdpa_attention_equals_explicit_masked_softmax_with_padding():
    torch.manual_seed(0)
    config = get_config("small", vocab_size=VOCAB)
    sdpa = BertSelfAttention(config).eval()
    explicit = MultiHeadAttention(config.hidden_size, config.num_heads, 0.0).eval()
    with torch.no_grad():
        for kind in ("weight", "bias"):
            for proj, part in zip((explicit.W_q, explicit.W_k, explicit.W_v), getattr(sdpa.qkv, kind).chunk(3)):
                getattr(proj, kind).copy_(part)
            getattr(explicit.W_o, kind).copy_(getattr(sdpa.dense, kind))
    x = torch.randn(4, 24, config.hidden_size)
    valid = torch.tensor([24, 17, 9, 1])
    ours = sdpa(x, TokenLayout(key_padding_mask(valid, 24), None))
    theirs = explicit(x, x, x, valid)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_fused_mlm_loss_equals_logits_loss_in_value_gradients_and_accuracy():
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0))
    b = make_batch()
    args = (b["tokens"], b["segments"], b["valid_len"], b["pred_positions"])
    plain = model(*args)
    logits, nsp_logits = plain.prediction_logits, plain.seq_relationship_logits
    w = b["mlm_weights"].reshape(-1)
    expected = (F.cross_entropy(logits.flatten(0, 1), b["mlm_labels"].reshape(-1), reduction="none") * w).sum()
    expected = expected / (w.sum() + 1e-8)
    expected_correct = ((logits.argmax(-1) == b["mlm_labels"]).float() * b["mlm_weights"]).sum()
    (expected + F.cross_entropy(nsp_logits, b["nsp_label"])).backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = model(*args, mlm_labels=b["mlm_labels"], mlm_weights=b["mlm_weights"], nsp_label=b["nsp_label"])
    loss, correct = fused.mlm_loss, fused.mlm_correct
    assert fused.prediction_logits is None  # the fused path never forms the logits
    fused.loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert correct.item() == expected_correct.item()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_linear_cross_entropy_with_zero_scaled_rows_across_chunks(monkeypatch):
    # The accelerator path keeps padded slots with scale 0; chunks smaller than the rows exercise the loop.
    monkeypatch.setattr("bertds.model.heads.LOSS_CHUNK", 7)
    torch.manual_seed(0)
    decoder = MLMDecoder(16, 50)  # the public face of the chunked linear + cross-entropy
    with torch.no_grad():
        decoder.weight.normal_(), decoder.bias.normal_()  # logits of order 1, as with real activations
    x = torch.randn(20, 16, requires_grad=True)
    weight, bias = decoder.weight, decoder.bias
    labels = torch.randint(0, 50, (20,))
    scale = torch.rand(20) * (torch.arange(20) % 3 != 0)
    loss, correct = decoder(x, labels, scale)
    loss.backward()
    grads = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    logits = F.linear(x, weight, bias)
    expected = (F.cross_entropy(logits, labels, reduction="none") * scale).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    assert correct.item() == ((logits.argmax(-1) == labels) & (scale > 0)).sum().item()
    for got, t in zip(grads, (x, weight, bias)):
        torch.testing.assert_close(got, t.grad)


def test_linear_cross_entropy_in_bf16_matches_float32_across_chunks(monkeypatch):
    # bf16 training: the fused loss runs its matmuls in 16 bits and its softmax in fp32; loss, accuracy and gradients
    # must match the fp32 computation on the same (bf16-representable) values to bf16 precision.
    monkeypatch.setattr("bertds.model.heads.LOSS_CHUNK", 16)
    torch.manual_seed(0)
    decoder = MLMDecoder(32, 300)
    with torch.no_grad():
        decoder.weight.normal_(), decoder.bias.normal_()
    x32 = torch.randn(50, 32).bfloat16().float()  # exact in both dtypes
    labels, scale = torch.randint(0, 300, (50,)), torch.rand(50) / 50
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoder.to(dtype)
        decoder.zero_grad()
        x = x32.to(dtype).detach().requires_grad_()
        loss, correct = decoder(x, labels, scale)
        loss.backward()
        grads = (x.grad, decoder.weight.grad, decoder.bias.grad)
        results[dtype] = (loss, correct, *(g.float().clone() for g in grads))  # .to() would convert them later
    (loss32, correct32, *grads32), (loss16, correct16, *grads16) = results[torch.float32], results[torch.bfloat16]
    assert loss16.dtype == torch.float32  # the loss is summed in fp32 whatever the weights' dtype
    torch.testing.assert_close(loss16, loss32, rtol=1e-2, atol=0)
    assert abs(correct16.item() - correct32.item()) <= 1  # a near tie may flip in bf16
    for got, expected in zip(grads16, grads32):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_linear_cross_entropy_is_exact_far_from_the_label():
    # Labels hundreds of nats below the row's best logit: exp(label - max) underflows in float32, and the loss must
    # still be the exact log-sum-exp difference (the normaliser comes from the largest probability, never the label's).
    decoder = MLMDecoder(2, 4)
    with torch.no_grad():
        decoder.weight.copy_(torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 50.0], [0.0, 0.0]]))
        decoder.bias.zero_()
    x = torch.tensor([[3.0, 0.0], [0.0, -2.0], [-1.0, 1.0]], requires_grad=True)
    labels, scale = torch.tensor([1, 2, 0]), torch.ones(3)
    loss, correct = decoder(x, labels, scale)
    expected = F.cross_entropy(F.linear(x, decoder.weight, decoder.bias), labels, reduction="sum")
    assert expected.item() > 900  # 600 + 101.1 + 200 nats: the regime the test is about
    torch.testing.assert_close(loss, expected)
    assert correct.item() == 0


def test_reference_bert_is_the_same_computation():
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=VOCAB, pad_token_id=1)).eval()
    reference = BERTModel(model.config).eval()
    load_bertds_state_dict(reference, model.state_dict())
    b = make_batch()
    ours = model(**b).loss
    torch.testing.assert_close(ours, pretraining_loss(reference, b, VOCAB), rtol=1e-5, atol=1e-5)


def test_compiled_encoder_gives_the_same_loss_as_eager():
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=VOCAB)).eval()
    b = make_batch()
    args = (b["tokens"], b["segments"], b["valid_len"], b["pred_positions"])
    kwargs = {"mlm_labels": b["mlm_labels"], "mlm_weights": b["mlm_weights"]}
    eager = model(*args, **kwargs).mlm_loss
    keys = list(model.state_dict())
    model.bert.compile()
    compiled = model(*args, **kwargs).mlm_loss
    assert list(model.state_dict()) == keys  # compiled in place: the checkpoint names stay
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_unpadded_encoder_equals_padded_in_outputs_and_gradients():
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0))
    b = make_batch()
    results = []
    for unpad in (False, True):
        model.zero_grad()
        encoded = model.bert(b["tokens"], b["segments"], b["valid_len"], unpad=unpad)
        valid = key_padding_mask(b["valid_len"], encoded.shape[1]).view(encoded.shape[:2])
        (encoded[valid] * torch.linspace(-1, 1, encoded.shape[-1])).sum().backward()
        results.append((encoded[valid], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (padded, padded_grads), (unpadded, unpadded_grads) = results
    torch.testing.assert_close(unpadded, padded, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == unpadded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(unpadded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cpu_dropout_keeps_1_minus_p_scaled_and_is_seeded():
    dropout = Dropout(0.2).train()
    x = torch.ones(1_000_000, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.002  # 400 standard deviations would be 0.2
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1.25))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows through exactly the kept units, scaled alike
    torch.manual_seed(3)
    assert torch.equal(dropout(x), y)
    assert torch.equal(dropout.eval()(x), x)


def test_cpu_attention_with_dropout_equals_sdpa_when_nothing_is_dropped(monkeypatch):
    # The explicit CPU training path (fast dropout mask) against SDPA: with a mask that keeps everything they
    # must agree in value and gradient (up to float32 summation order: a key row with one valid token has
    # gradients that are 0 in one and ~1e-6 in the other); with p > 0 kept probabilities are rescaled by 1 / (1 - p).
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8, requires_grad=True) for _ in range(3))
    mask = key_padding_mask(torch.tensor([10, 6, 1]), 10)
    monkeypatch.setattr("bertds.model.cpu_fastpath.cpu_dropout_mask", lambda shape, p: torch.full(shape, 1 / (1 - p)))
    ours = attention(q, k, v, mask, 0.5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * 2  # kept probabilities × 1 / (1 - p)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(ours.sum(), (q, k, v))
    # atol 1e-5: the row with one valid key has exactly zero q/k gradients in exact arithmetic, rounding noise here
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_rank_zero0_step_skips_the_all_reduce_and_updates_as_plain_pytorch(process_group, monkeypatch):
    import copy

    import deepspeed

    from bertds.engine import micro_step

    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0))
    plain = copy.deepcopy(model)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        config={"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9, "gradient_clipping": 0.0},
    )  # DeepSpeed's default is 1.0
    reduced = []
    monkeypatch.setattr(engine, "allreduce_gradients", lambda *a, **k: reduced.append(1))
    b = make_batch()
    micro_step(engine, b)
    assert not reduced  # nothing to all-reduce with one rank
    plain(**b).loss.backward()
    torch.optim.SGD(plain.parameters(), lr=0.5).step()
    for (name, ours), theirs in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_unpadded_attention_equals_padded_attention_with_the_same_dropout_in_values_and_gradients(monkeypatch):
    torch.manual_seed(0)
    heads, head_dim, seq_len = 2, 8, 10
    layout = TokenLayout.from_valid_lens(torch.tensor([10, 6, 1]), seq_len, unpad=True)
    qkv = torch.randn(len(layout.index), 3 * heads * head_dim, requires_grad=True)
    drop = torch.bernoulli(torch.full((3, heads, seq_len, seq_len), 0.7)) / 0.7
    monkeypatch.setattr("bertds.model.cpu_fastpath.cpu_dropout_mask", lambda shape, p: drop)
    ours = unpadded_attention(qkv, layout.grid_rows, layout.grid_cols, layout.mask, heads, 0.3)
    # The straightforward computation: pad, split heads, masked softmax, the same dropout, merge heads, unpad.
    grid = layout.pad(qkv).view(3, seq_len, 3, heads, head_dim)
    q, k, v = (t.transpose(1, 2) for t in grid.unbind(dim=2))
    scores = (q @ k.transpose(-1, -2) / head_dim**0.5).masked_fill(~layout.mask, float("-inf"))
    expected = layout.unpad((scores.softmax(-1) * drop @ v).transpose(1, 2).reshape(3, seq_len, -1))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(ours)
    (got,), (want,) = (torch.autograd.grad((out * weights).sum(), qkv) for out in (ours, expected))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
