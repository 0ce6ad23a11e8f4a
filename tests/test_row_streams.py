"""Streaming every row of a batch (`diffusion_generate(streamer=[...])`, one streamer per row, as `dlm-adapt serve`
uses it): each row's streamer gets exactly that row's new tokens, up to its EOS, in every decoding mode; a row whose
streamer is cancelled stops early and the other rows' tokens do not change."""

import pytest
import torch

import adapt
from adapt.sampling import SamplingError


class Collect:
    def __init__(self, cancel_after: int | None = None):
        self.puts, self.ended, self.cancel_after = [], False, cancel_after

    def put(self, ids):
        self.puts.append(ids.reshape(-1).tolist())

    def end(self):
        self.ended = True

    @property
    def cancelled(self):  # after the prompt and `cancel_after` pieces of new tokens
        return self.cancel_after is not None and len(self.puts) > self.cancel_after

    def new_tokens(self):
        return [t for piece in self.puts[1:] for t in piece]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny_models import save_tiny_source

    root = tmp_path_factory.mktemp("rows")
    save_tiny_source(root / "src", "llama")
    adapt.convert(root / "src", root / "full")
    adapt.convert(root / "src", root / "block", block_size=4)
    adapt.convert(root / "src", root / "drafter", block_size=4, drafter=True)
    return {name: adapt.load(root / name)[0] for name in ("full", "block", "drafter")}


def _batch(model):
    lengths, width = [5, 2, 7], 7
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.mask_token_id if model.config.mask_token_id > 10 else 90, (3, width),
                        generator=g)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("mode", ["full", "block", "speculative"])
def test_each_row_streams_its_own_tokens(checkpoints, mode):
    model = checkpoints[{"full": "full", "block": "block", "speculative": "drafter"}[mode]]
    ids, mask = _batch(model)
    options = dict(max_new_tokens=12, speculative=True) if mode == "speculative" else dict(max_new_tokens=12, steps=6)
    if mode == "full":
        options["block_length"] = 4
    streams = [Collect(), None, Collect()]
    out = model.diffusion_generate(ids, attention_mask=mask, streamer=streams, return_dict_in_generate=True,
                                   **options)
    eos = model.generation_config.eos_token_id
    for row in (0, 2):
        new = out.sequences[row, ids.shape[1]:].tolist()
        expected = new[: new.index(eos) + 1] if eos in new else new
        assert streams[row].new_tokens() == expected and streams[row].ended
        assert streams[row].puts[0] == ids[row].tolist()  # the prompt first, as transformers' streamers expect
        assert len(streams[row].puts) > 2 or len(expected) <= 4  # piece by piece, not all at the end


@pytest.mark.parametrize("mode", ["full", "block", "speculative"])
def test_a_cancelled_row_stops_and_the_others_do_not_change(checkpoints, mode):
    model = checkpoints[{"full": "full", "block": "block", "speculative": "drafter"}[mode]]
    ids, mask = _batch(model)
    options = dict(max_new_tokens=16, min_new_tokens=16)
    options.update(speculative=True, draft_length=2) if mode == "speculative" else options.update(
        steps=16, block_length=4 if mode == "full" else None)
    whole = model.diffusion_generate(ids, attention_mask=mask, return_dict_in_generate=True, **options)
    streams = [Collect(cancel_after=1), Collect(), None]
    cut = model.diffusion_generate(ids, attention_mask=mask, streamer=streams, return_dict_in_generate=True,
                                   **options)
    assert cut.row_nfe[0] < whole.row_nfe[0]  # the cancelled row stopped early, and was handed nothing after
    assert len(streams[0].puts) == 2 and model.config.mask_token_id not in streams[0].new_tokens()
    assert torch.equal(cut.sequences[1:], whole.sequences[1:]) and torch.equal(cut.row_nfe[1:], whole.row_nfe[1:])


def test_a_list_of_streamers_must_have_one_per_row(checkpoints):
    model = checkpoints["block"]
    ids, mask = _batch(model)
    with pytest.raises(SamplingError, match="one streamer per row"):
        model.diffusion_generate(ids, attention_mask=mask, streamer=[Collect()], max_new_tokens=4)
