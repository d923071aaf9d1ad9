import pytest
import torch

from bertds.errors import UserError
from bertds.model import MODEL_PRESETS, BertForPreTraining, get_config, num_parameters
from bertds.model.layers import TokenLayout, key_padding_mask


def random_batch(vocab_size, batch=3, seq_len=16, preds=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, vocab_size, (batch, seq_len), generator=g)
    segments = (torch.arange(seq_len) >= seq_len // 2).long().expand(batch, -1).clone()
    valid_lens = torch.tensor([seq_len, seq_len - 5, 7])[:batch]
    pred_positions = torch.randint(1, 7, (batch, preds), generator=g)
    return tokens, segments, valid_lens, pred_positions


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_output_shapes_for_every_preset(name):
    config = get_config(name, vocab_size=1000)
    device = "cpu" if name in ("tiny", "small") else "meta"  # base/large: shapes without allocating weights
    with torch.device(device):
        model = BertForPreTraining(config)
    tokens, segments, valid_lens, pred_positions = (t.to(device) for t in random_batch(1000))
    out = model(tokens, segments, valid_lens, pred_positions)
    assert out.last_hidden_state.shape == (3, 16, config.hidden_size)
    assert out.prediction_logits.shape == (3, 4, 1000)
    assert out.seq_relationship_logits.shape == (3, 2)
    assert out.loss is None and out.mlm_loss is None and out.nsp_loss is None  # no labels given
    assert model(tokens, segments, valid_lens).prediction_logits is None


@pytest.mark.parametrize("name,expected_millions", [("base", 110), ("large", 335)])
def test_parameter_counts_match_bert_paper(name, expected_millions):
    with torch.device("meta"):
        model = BertForPreTraining(get_config(name, vocab_size=30522))
    assert abs(num_parameters(model) / 1e6 - expected_millions) / expected_millions < 0.01


def test_base_preset_is_hugging_faces_bert_base_and_presets_override():
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertConfig()  # bert-base-uncased's shape
    base = get_config("base")
    assert (
        base.num_layers,
        base.hidden_size,
        base.num_heads,
        base.ffn_size,
        base.max_position_embeddings,
        base.layer_norm_eps,
        base.initializer_range,
    ) == (
        hf.num_hidden_layers,
        hf.hidden_size,
        hf.num_attention_heads,
        hf.intermediate_size,
        hf.max_position_embeddings,
        hf.layer_norm_eps,
        hf.initializer_range,
    )
    assert get_config("tiny", dropout=0.3).dropout == 0.3
    assert get_config("tiny", dropout=None).dropout == get_config("tiny").dropout  # None keeps the preset's


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_built_model_follows_its_preset(name):
    config = get_config(name, vocab_size=100)
    with torch.device("meta"):
        model = BertForPreTraining(config)
    assert len(model.bert.encoder.layer) == config.num_layers
    layer = model.bert.encoder.layer[0]
    assert layer.attention.qkv.weight.shape == (3 * config.hidden_size, config.hidden_size)
    assert layer.intermediate.weight.shape == (config.ffn_size, config.hidden_size)
    assert layer.attention.num_heads == config.num_heads


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'huge'"):
        get_config("huge")


@pytest.mark.parametrize("unpad", [False, True])
def test_padding_does_not_change_valid_encodings(unpad):
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=500)).eval()
    tokens, segments, valid_lens, _ = random_batch(500)
    changed = tokens.clone()
    for row, n in enumerate(valid_lens.tolist()):
        changed[row, n:] = torch.randint(5, 500, (16 - n,))
        segments[row, n:] = 1 - segments[row, n:]
    a = model.bert(tokens, segments, valid_lens, unpad=unpad)
    b = model.bert(changed, segments, valid_lens, unpad=unpad)
    for row, n in enumerate(valid_lens.tolist()):
        torch.testing.assert_close(a[row, :n], b[row, :n], rtol=0, atol=1e-6)
    if unpad:  # the padding is never computed
        assert a[1, 11:].abs().sum() == 0 and b[1, 11:].abs().sum() == 0
    else:  # the padded positions themselves are computed, and did change
        assert not torch.allclose(a[1, 11:], b[1, 11:])


def test_attention_mask_from_valid_lens():
    mask = key_padding_mask(torch.tensor([2, 4]), 4)
    assert mask.shape == (2, 1, 1, 4)
    assert mask[:, 0, 0].tolist() == [[True, True, False, False], [True, True, True, True]]


def test_mlm_decoder_is_tied_to_token_embedding_and_can_be_untied():
    model = BertForPreTraining(get_config("tiny", vocab_size=300))
    embedding = model.bert.embeddings.word_embeddings.weight
    assert model.mlm.decoder.weight is embedding
    tokens, segments, valid_lens, pred_positions = random_batch(300)
    model(tokens, segments, valid_lens, pred_positions).prediction_logits.sum().backward()
    before = embedding.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert model.mlm.decoder.weight.data_ptr() == embedding.data_ptr()
    assert not torch.equal(before, embedding)
    untied = BertForPreTraining(get_config("tiny", vocab_size=300, tie_word_embeddings=False))
    assert untied.mlm.decoder.weight is not untied.bert.embeddings.word_embeddings.weight
    assert num_parameters(untied) == num_parameters(model) + 300 * 128


def test_gathered_mlm_logits_equal_full_sequence_logits():
    model = BertForPreTraining(get_config("tiny", vocab_size=400)).eval()
    tokens, segments, valid_lens, pred_positions = random_batch(400)
    out = model(tokens, segments, valid_lens, pred_positions)
    all_positions = torch.arange(16).expand(3, -1)
    full = model(tokens, segments, valid_lens, all_positions).prediction_logits
    mlm_logits = out.prediction_logits
    expected = full.gather(1, pred_positions[..., None].expand(-1, -1, 400))
    torch.testing.assert_close(mlm_logits, expected, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("tiny", vocab_size=300, dropout=0.0, attention_dropout=0.0))
    batch = random_batch(300)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(enabled)
        out = model(*batch)
        (out.prediction_logits.sum() + out.seq_relationship_logits.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_pre_layernorm_moves_the_layernorms_onto_the_branches():
    torch.manual_seed(0)
    post = BertForPreTraining(get_config("tiny", vocab_size=300, dropout=0.0, attention_dropout=0.0)).eval()
    pre = BertForPreTraining(
        get_config("tiny", vocab_size=300, dropout=0.0, attention_dropout=0.0, pre_layernorm=True)
    ).eval()
    assert post.bert.encoder.final_LayerNorm is None
    assert set(pre.state_dict()) - set(post.state_dict()) == {
        "bert.encoder.final_LayerNorm.weight",
        "bert.encoder.final_LayerNorm.bias",
    }
    layer, x = pre.bert.encoder.layer[0], torch.randn(2, 5, 128)
    layout = TokenLayout.from_valid_lens(torch.tensor([5, 3]), 5, unpad=False)
    with torch.no_grad():
        h = x + layer.attention(layer.attention_LayerNorm(x), layout)
        expected = h + layer.feed_forward(layer.output_LayerNorm(h))
        torch.testing.assert_close(layer(x, layout), expected)
        # post-LN: the block's output is normalised, the pre-LN residual stream is not
        out = post.bert.encoder.layer[0](x, layout)
        torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
        assert layer(x, layout).mean(-1).abs().max() > 1e-3
