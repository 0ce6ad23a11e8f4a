"""The drafter's training view (`drafter_training_logits`): clean sequences and groups of masks, with decoding's
attention and gate. The student is exactly what decoding drafts from for the same prefix; the
teacher is the parent's causal logits given the true prefix; padding changes neither; gradients reach the adapter."""

import pytest
import torch

import adapt
from adapt.model.drafter_masked_diffusion import drafter_training_logits, drafting, fused_forward
from adapt.model.transformers_compat import enable_activation_checkpointing
from adapt.model.speculative_masked_diffusion import HoleyCache
from test_speculative import _trained, _with_drafter
from tiny_models import ARCHS, save_tiny_source

TEXT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
K = 3


@pytest.fixture(scope="module")
def drafters(tmp_path_factory):
    cache = {}

    def get(arch, attn="eager"):
        if (arch, attn) not in cache:
            root = tmp_path_factory.mktemp(f"view-{arch}-{attn}")
            save_tiny_source(root / "src", arch)
            model, _ = adapt.load(adapt.convert(root / "src", root / "dlm", block_size=4), attn_implementation=attn)
            cache[arch, attn] = _trained(_with_drafter(model.eval()))
        return cache[arch, attn]

    return get


def _decoded_groups(model, text, cached, drafted):
    """Decoding's fused rounds over `text`: the prefill of text[:cached] (one group), then a round whose clean
    tokens are the next 1 + `drafted` tokens (groups after each). Returns the parent's logits of the second round
    and every group's draft logits, with the cut each group drafts at."""
    cache = HoleyCache(1, text.device)
    first = text[:, :cached]
    _, prefill = fused_forward(model, cache, first, torch.ones_like(first), 0, K)
    clean = text[:, cached: cached + 1 + drafted]
    verify, groups = fused_forward(model, cache, clean, None, drafted, K)  # as decoding's later rounds: no padding
    cuts = [cached + 1] + [cached + 2 + j for j in range(drafted + 1)]  # a group after position p drafts at p + 2
    return verify, torch.cat([prefill, groups], 1), cuts


@pytest.mark.parametrize("arch", ARCHS)
def test_student_is_the_decoding_draft_and_teacher_the_parent(drafters, arch):
    model = drafters(arch)
    text = torch.tensor([TEXT])
    with torch.no_grad():
        verify, decoded, cuts = _decoded_groups(model, text, 5, 2)
        student, teacher = drafter_training_logits(model, text, torch.ones_like(text), torch.tensor([cuts]), K)
        parent = model(text, is_causal=True).logits
    assert student.shape == teacher.shape == (1, len(cuts), K, parent.shape[-1])
    torch.testing.assert_close(student, decoded, atol=1e-5, rtol=0)
    for g, cut in enumerate(cuts):
        torch.testing.assert_close(teacher[0, g], parent[0, cut - 1: cut - 1 + K], atol=1e-5, rtol=0)
    torch.testing.assert_close(verify[0], parent[0, 5:8], atol=1e-5, rtol=0)  # the parent verifies in decoding
    assert not torch.allclose(student, teacher, atol=1e-3)  # the drafter is not the parent


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_changes_nothing(drafters, attn):
    """Rows of different lengths, left- and right-padded, each give what they give alone."""
    model = drafters("llama", attn)
    rows = [TEXT, TEXT[:9]]
    cuts = [[2, 6, 11], [3, 5, 6]]
    with torch.no_grad():
        alone = [drafter_training_logits(model, torch.tensor([r]), None, torch.tensor([c]), K)
                 for r, c in zip(rows, cuts)]
        for side in ("left", "right"):
            pad = [[3] * (len(TEXT) - len(r)) for r in rows]
            ids = torch.tensor([p + r if side == "left" else r + p for p, r in zip(pad, rows)])
            mask = torch.tensor([[0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p)
                                 for p, r in zip(pad, rows)])
            student, teacher = drafter_training_logits(model, ids, mask, torch.tensor(cuts), K)
            for row, (s, t) in enumerate(alone):
                torch.testing.assert_close(student[row], s[0], atol=1e-5, rtol=0)
                torch.testing.assert_close(teacher[row], t[0], atol=1e-5, rtol=0)


def _adapter_grads(model, text):
    with drafting(model):  # the backward inside it: activation checkpointing recomputes with the adapter
        student, teacher = drafter_training_logits(model, text, None, torch.tensor([[2, 7]]), K)
        assert student.requires_grad and not teacher.requires_grad
        (student.log_softmax(-1) * teacher.softmax(-1)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.drafter.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_gradients_reach_the_adapter_only(tmp_path):
    """The two passes (clean tokens into the parent's cache without gradients, then the masks) and the one forward
    that activation checkpointing needs give the same gradients, and only to the adapter."""
    save_tiny_source(tmp_path / "src", "llama")
    model, _ = adapt.load(adapt.convert(tmp_path / "src", tmp_path / "dlm", block_size=4), attn_implementation="eager")
    model = _trained(_with_drafter(model))
    model.decoder.requires_grad_(False)
    text = torch.tensor([TEXT])
    with torch.no_grad():  # decoding's path (A^T and s B^T prepared once) gives the training path's logits
        frozen, _ = drafter_training_logits(model, text, None, torch.tensor([[2, 7]]), K)
    student, _ = drafter_training_logits(model, text, None, torch.tensor([[2, 7]]), K)
    torch.testing.assert_close(student.detach(), frozen, atol=1e-5, rtol=0)
    grads = _adapter_grads(model, text)
    names = [name for name, _ in model.drafter.named_parameters()]
    assert sorted(grads) == sorted(names) and all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.decoder.parameters())
    model.train()
    enable_activation_checkpointing(model)
    again = _adapter_grads(model, text)
    for name in names:
        torch.testing.assert_close(again[name], grads[name], atol=1e-6, rtol=1e-5)


def test_bad_cuts_are_refused(drafters):
    model = drafters("llama")
    text = torch.tensor([TEXT])
    for cuts in ([[1]], [[len(TEXT) - K + 1]]):
        with pytest.raises(ValueError, match="cuts must lie in"):
            drafter_training_logits(model, text, None, torch.tensor(cuts), K)
    with pytest.raises(ValueError, match="draft length must be at least 1"):
        drafter_training_logits(model, text, None, torch.tensor([[4]]), 0)
