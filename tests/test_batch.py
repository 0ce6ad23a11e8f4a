"""The typed training batch, packing, the shared held-out split, and the loader's order over both kinds of data."""

import pytest
import torch

from adapt.training.batch import Batch, as_batch
from adapt.training.blocks import documents
from adapt.training.data import SequenceLoader, document_separator, hold_out, pack
from adapt.errors import AdaptError
from tiny_models import tiny_tokenizer


def sft_batch():
    ids = torch.arange(12).view(3, 4)
    maskable = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    return Batch(ids, maskable, attention)


def _bos_first(tokenizer):
    """The tiny tokenizer with LLaMA's default: BOS before every text."""
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", tokenizer.bos_token_id)])
    return tokenizer


@pytest.mark.parametrize("bos", [False, True], ids=["eos-after", "bos-first"])
def test_packed_documents_look_as_the_tokenizer_makes_a_text(bos):
    """A tokenizer that puts BOS first (LLaMA, Gemma, Mistral) gets its BOS before each document and nothing after:
    what its model saw in pretraining and what `generate` gives it; one that adds nothing (GPT-2, Qwen) gets EOS
    after each. The document ids that keep packed documents apart follow the same marks."""
    tok = _bos_first(tiny_tokenizer()) if bos else tiny_tokenizer()
    docs = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
    rows = pack(docs, tok, 6, "t")
    plain = [tok(d, add_special_tokens=False).input_ids for d in docs]
    b, e = tok.bos_token_id, tok.eos_token_id
    stream = sum(([b, *ids] if bos else [*ids, e] for ids in plain), [])
    assert rows.flatten().tolist() == stream[:len(rows.flatten())] and rows.shape == (2, 6)
    assert document_separator(tok) == (("bos", b) if bos else ("eos", e))
    ids = documents(rows.view(1, -1), document_separator(tok))[0]
    assert (ids - ids[0]).tolist() == [0] * 4 + [1] * 3 + [2] * 5


@pytest.mark.parametrize("bos", [False, True], ids=["eos-after", "bos-first"])
def test_a_named_separator_follows_each_document_whatever_the_tokenizer_adds(bos):
    """`data.separator`: for a parent pretrained with a separator its tokenizer does not add, that token goes
    after each document instead, and no BOS is added."""
    tok = _bos_first(tiny_tokenizer()) if bos else tiny_tokenizer()
    docs = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
    rows = pack(docs, tok, 6, "t", separator="<pad>")
    pad = tok.pad_token_id
    stream = sum(([*tok(d, add_special_tokens=False).input_ids, pad] for d in docs), [])
    assert rows.flatten().tolist() == stream[:12]
    assert document_separator(tok, "<pad>") == ("eos", pad)
    ids = documents(rows.view(1, -1), document_separator(tok, "<pad>"))[0]
    assert (ids - ids[0]).tolist() == [0] * 4 + [1] * 3 + [2] * 5


@pytest.mark.parametrize("token, error", [("<nothere>", "'<nothere>' is not a token of the tokenizer's vocabulary"),
                                          ("<mask>", "is the \\[MASK\\] token"),
                                          ("w2", "'w2' is an ordinary token of the text")])
def test_a_separator_the_tokenizer_lacks_an_ordinary_word_or_the_mask_is_one_clear_error(token, error):
    with pytest.raises(AdaptError, match=error):
        pack(["w1 w2"], tiny_tokenizer(mask_token=True), 2, "t", separator=token)


def test_packing_without_any_separator_is_one_clear_error():
    tok = tiny_tokenizer()
    tok.eos_token = None
    with pytest.raises(AdaptError, match="no EOS token"):
        pack(["w1 w2"], tok, 2, "t")


def test_packed_rows_are_all_maskable_and_real():
    x0, maskable, padding = Batch(torch.arange(8).view(2, 4)).split()
    assert x0.shape == (2, 4) and maskable.all() and maskable.dtype == torch.bool and (padding == 1).all()


def test_sft_rows_drop_columns_that_are_padding_everywhere():
    x0, maskable, padding = sft_batch().split()
    assert x0.shape == maskable.shape == padding.shape == (3, 3)
    assert torch.equal(x0, torch.arange(12).view(3, 4)[:, :3])


def test_rows_select_every_field_and_move_together():
    batch = sft_batch()
    picked = batch[torch.tensor([2, 0])]
    assert len(picked) == 2 and torch.equal(picked.input_ids, batch.input_ids[[2, 0]])
    assert torch.equal(picked.maskable, batch.maskable[[2, 0]])
    assert torch.equal(picked.attention_mask, batch.attention_mask[[2, 0]])
    assert len(batch[:2]) == 2 and len(batch[-1]) == 1 and batch[1].shape == (1, 4)
    assert batch.to("cpu").input_ids.device.type == "cpu"
    assert Batch(torch.zeros(2, 3)).to("cpu").maskable is None


def test_cat_fills_in_masks_only_where_needed():
    both = Batch.cat([sft_batch(), Batch(torch.zeros(1, 4, dtype=torch.long))])
    assert len(both) == 4 and both.maskable[3].all() and (both.attention_mask[3] == 1).all()
    assert Batch.cat([Batch(torch.zeros(1, 4)), Batch(torch.ones(2, 4))]).maskable is None


def test_as_batch_takes_token_ids_or_a_batch_and_nothing_else():
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert as_batch(ids).input_ids is ids and as_batch(sft_batch()).maskable is not None
    with pytest.raises(TypeError, match="shape \\(2, 3, 5\\)"):
        as_batch(torch.zeros(2, 3, 5, dtype=torch.long))


@pytest.mark.parametrize("n,fraction,seed", [(10, 0.05, 0), (300, 0.05, 0), (57, 0.2, 7), (1000, 0.01, 123)])
def test_hold_out_splits_every_item_once_and_keeps_the_training_order(n, fraction, seed):
    items = [f"doc {i}" for i in range(n)]
    kept, held = hold_out(items, fraction, seed, "d", "documents")
    assert len(held) == max(1, int(n * fraction)) and sorted(kept + held) == sorted(items)
    assert kept == [x for x in items if x not in held]  # the training data keeps its order
    assert hold_out(items, fraction, seed, "d", "documents") == (kept, held)  # the seed decides
    assert hold_out(items, fraction, seed + 1, "d", "documents")[1] != held


def test_hold_out_is_the_split_runs_have_always_made():
    """Pinned: a changed split would move documents between a resumed run's training and validation data."""
    assert hold_out([f"doc {i}" for i in range(10)], 0.2, 0, "d", "documents")[1] == ["doc 4", "doc 1"]
    assert hold_out([f"doc {i}" for i in range(57)], 0.2, 7, "d", "documents")[1] == [
        "doc 51", "doc 21", "doc 3", "doc 41", "doc 27", "doc 36", "doc 2", "doc 5", "doc 18", "doc 50", "doc 14"]


def test_hold_out_refuses_to_hold_out_everything():
    with pytest.raises(AdaptError, match="too few samples \\(1\\)"):
        hold_out(["only"], 0.5, 0, "d.jsonl", "samples")


def test_loader_order_is_the_same_over_a_batch_and_its_ids():
    ids = torch.arange(40).view(10, 4)
    loader = SequenceLoader(Batch(ids), 3, seed=5)
    for epoch in range(2):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch))
        for start in range(0, 9, 3):
            assert torch.equal(loader.next().input_ids, ids[order[start:start + 3]])
    assert loader.state() == {"epoch": 1, "index": 9}
