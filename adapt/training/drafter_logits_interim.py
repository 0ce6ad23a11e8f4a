"""INTERIM: `drafter_training_logits` for today's drafter (block-diffusion drafting over its own cache), until the
remote code ships its own (issue 25: one forward over the clean stream plus the mask groups). Same contract, so the
drafter run swaps one import: `(student, teacher)` of shape (batch, G, k, V) for the k tokens after each cut.

Each group is its own row here, [tokens before the cut, k x MASK], left-padded and run with the adapter on under
the checkpoint's block attention, exactly the drafter pass of `speculative_sample`; the teacher is one causal pass
of the parent over the clean rows."""

import torch

from ..model.speculative_masked_diffusion import drafting


def drafter_training_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cuts: torch.Tensor,
                            draft_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, groups = cuts.shape
    k, mask_id, shift = draft_length, model.config.mask_token_id, int(model.config.shift)
    with torch.no_grad():
        parent = model(input_ids=input_ids, attention_mask=attention_mask, is_causal=True).logits
    # the parent's logit at position j predicts token j + 1
    targets = (cuts[:, :, None] + torch.arange(k, device=cuts.device) - 1).clamp(max=input_ids.shape[1] - 1)
    teacher = parent.gather(1, targets.reshape(batch, -1)[..., None].expand(-1, -1, parent.shape[-1]))
    teacher = teacher.reshape(batch, groups, k, -1).detach()

    width = int(cuts.max()) + k
    ids = input_ids.new_zeros((batch * groups, width))
    padding = torch.zeros((batch * groups, width), dtype=torch.long, device=input_ids.device)
    for row, (b, g) in enumerate((b, g) for b in range(batch) for g in range(groups)):
        c = int(cuts[b, g])
        ids[row, width - c - k:width - k] = input_ids[b, :c]
        padding[row, width - c - k:] = 1
        ids[row, width - k:] = mask_id
    keep = torch.arange(width - k - shift, width - shift, device=ids.device)
    with drafting(model):
        student = model(input_ids=ids, attention_mask=padding, logits_to_keep=keep).logits
    return student.reshape(batch, groups, k, -1), teacher
