"""The lm-evaluation-harness backend (`--model dlm-adapt`), offline: tasks are YAMLs over JSON files written here.
Agreement with lm-eval's own `hf` backend on the source model, the estimator against closed forms, generation
against one-by-one decoding, `dlm-adapt eval --tasks`, and its one-line errors."""

import json
import math
import os
import random

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import adapt  # noqa: E402
from adapt import AdaptError  # noqa: E402
from adapt.cli import main  # noqa: E402
from adapt.evaluation.lm_eval_backend import DLMAdaptLM  # noqa: E402
from test_eval import V, fixed  # noqa: E402
from tiny_models import tiny_tokenizer  # noqa: E402


def words(rng, n):
    return " ".join(f"w{rng.randrange(96)}" for _ in range(n))


def write_task(directory, name, output_type, docs, **fields):
    data = directory / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    extra = "".join(f"{k}: {v}\n" for k, v in fields.items())
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        f"output_type: {output_type}\n{extra}")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, converted):
    """Three tasks: multiple choice (half the answers the source's greedy next word, so is_greedy and accuracy
    are not trivially false), rolling loglikelihood over short documents, generate_until."""
    from transformers import AutoModelForCausalLM

    src, _ = converted("llama")
    source = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = tiny_tokenizer()
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("tasks")
    mc = []
    for i in range(8):
        context = words(rng, 5)
        choices = [words(rng, 1 + j % 3) for j in range(4)]
        label = rng.randrange(4)
        if i % 2 == 0:
            with torch.no_grad():
                top = int(source(torch.tensor([tok.encode(context)])).logits[0, -1, :100].argmax())
            choices[label] = tok.convert_ids_to_tokens(top)
        mc.append({"context": context, "choices": choices, "label": label})
    write_task(directory, "toy_mc", "multiple_choice", mc, doc_to_text='"{{context}}"',
               doc_to_choice='"{{choices}}"', doc_to_target='"{{label}}"', target_delimiter='" "',
               metric_list="\n  - metric: acc")
    write_task(directory, "toy_roll", "loglikelihood_rolling", [{"text": words(rng, 6 + 5 * i)} for i in range(3)],
               doc_to_text='""', doc_to_target='"{{text}}"',
               metric_list="\n  - metric: word_perplexity\n  - metric: bits_per_byte")
    write_task(directory, "toy_gen", "generate_until",
               [{"prompt": words(rng, 4), "answer": words(rng, 2)} for _ in range(3)],
               doc_to_text='"{{prompt}}"', doc_to_target='"{{answer}}"',
               generation_kwargs="\n  until: [w7]\n  max_gen_toks: 4",
               metric_list="\n  - metric: exact_match")
    return directory


def run(model, tasks_dir, names, **kw):
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, log_samples=True, **kw)


def responses(result, task):
    return [r for s in sorted(result["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]


def test_is_causal_and_block_size_1_agree_with_lm_evals_hf_backend(converted, tasks, tmp_path):
    src, dlm = converted("llama")
    block1 = adapt.convert(src, tmp_path / "b1", block_size=1)
    names = ["toy_mc", "toy_roll"]
    hf = run("hf", tasks, names, model_args={"pretrained": str(src), "device": "cpu"}, batch_size=8)
    causal = run("dlm-adapt", tasks, names, model_args={"pretrained": str(dlm), "is_causal": True}, batch_size=8)
    # block size 1: every token masked with its clean prefix visible, so one draw is the exact AR NLL
    elbo = run("dlm-adapt", tasks, names, model_args=f"pretrained={block1},mc_samples=1", batch_size=8)
    expected = responses(hf, "toy_mc")
    assert len(expected) == 32 and 0 < sum(g for (_, g), in expected) < 32  # some greedy, some not
    for ours in (causal, elbo):
        got = responses(ours, "toy_mc")
        assert [g for (_, g), in got] == [g for (_, g), in expected]
        assert [lp for (lp, _), in got] == pytest.approx([lp for (lp, _), in expected], abs=1e-4)
        assert ours["results"]["toy_mc"]["acc,none"] == hf["results"]["toy_mc"]["acc,none"] > 0
        assert [r for r, in responses(ours, "toy_roll")] == pytest.approx(
            [r for r, in responses(hf, "toy_roll")], abs=1e-4)
        assert ours["results"]["toy_roll"]["word_perplexity,none"] == pytest.approx(
            hf["results"]["toy_roll"]["word_perplexity,none"], rel=1e-4)


def requests(pairs, kind="loglikelihood"):
    return [Instance(request_type=kind, doc={}, arguments=p, idx=0) for p in pairs]


def test_context_free_model_gives_its_closed_form_including_rolling_windows():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(V, generator=g) * 2
    exact = logp.clone()
    exact[V - 1] = -math.inf  # [MASK] is never a clean token
    exact = exact.log_softmax(0)
    tok = tiny_tokenizer(mask_token=True)

    def closed_form(text):
        return float(exact[tok.encode(text)].sum())

    lm = DLMAdaptLM(pretrained=fixed(logp), tokenizer=tok, mc_samples=3, max_length=12)
    # a continuation of one repeated token: every draw, whatever its mask count and subset, is exact
    pairs = [("w1 w2 w3", " " + " ".join([f"w{10 + n}"] * n)) for n in range(1, 5)]
    assert [lp for lp, _ in lm.loglikelihood(requests(pairs))] == pytest.approx(
        [closed_form(c) for _, c in pairs], abs=1e-4)
    # 40 tokens in windows of at most 12: each scored once, the prefix token only as context
    doc = " ".join(["w7"] * 40)
    assert lm.loglikelihood_rolling(requests([(doc,)], "loglikelihood_rolling")) == pytest.approx(
        [closed_form(doc)], abs=1e-4)
    # distinct tokens: exact in expectation over the draws (unbiased: within 4 standard errors over 16 seeds)
    mixed = requests([("w1 w2", " w5 w9 w30"), ("w4", " w50 w2 w8 w61")])
    runs = torch.tensor([[lp for lp, _ in DLMAdaptLM(pretrained=fixed(logp), tokenizer=tok, mc_samples=64,
                                                      batch_size=256, seed=s).loglikelihood(mixed)]
                         for s in range(16)], dtype=torch.float64)
    error = (runs.mean(0) - torch.tensor([closed_form(" w5 w9 w30"), closed_form(" w50 w2 w8 w61")])).abs()
    assert (error < 4 * runs.std(0) / math.sqrt(len(runs))).all() and (runs.std(0) > 0).all()


def test_mc_spread_shrinks_as_one_over_sqrt_k_and_runs_reproduce(converted):
    _, dlm = converted("llama")
    model, tok = adapt.load(dlm)
    rng = random.Random(2)
    reqs = requests([(words(rng, 4), " " + words(rng, 5)) for _ in range(2)])

    def scores(k, seed, batch_size=16):
        return [lp for lp, _ in DLMAdaptLM(pretrained=model, tokenizer=tok, mc_samples=k, seed=seed,
                                           batch_size=batch_size).loglikelihood(reqs)]

    one = torch.tensor([scores(1, s) for s in range(16)])
    many = torch.tensor([scores(16, s) for s in range(16)])
    # the spread over seeds shrinks at least as 1/√K (stratification may do better); 0.6: room for the
    # estimate of a spread from 16 runs
    assert (one.std(0) / many.std(0) > 0.6 * math.sqrt(16)).all()
    assert scores(16, 5) == scores(16, 5)
    assert scores(16, 5, batch_size=3) == pytest.approx(scores(16, 5, batch_size=64), abs=1e-5)
    assert scores(16, 5) != scores(16, 6)


def test_generate_until_stops_and_batches_like_one_by_one(converted):
    _, dlm = converted("llama")
    model, tok = adapt.load(dlm)
    rng = random.Random(3)
    prompts = [words(rng, n) for n in (2, 5, 3, 7)]
    lm = DLMAdaptLM(pretrained=model, tokenizer=tok, batch_size=4)
    free = {"until": [], "max_gen_toks": 6}
    batched = lm.generate_until(requests([(p, free) for p in prompts], "generate_until"))
    alone = [lm.generate_until(requests([(p, free)], "generate_until"))[0] for p in prompts]
    assert batched == alone and all(0 < len(t.split()) <= 6 for t in batched)
    stop = batched[1].split()[2]
    cut = lm.generate_until(requests([(prompts[1], {"until": [stop], "max_gen_toks": 6})], "generate_until"))[0]
    assert stop not in cut and batched[1].startswith(cut) and len(cut.split()) == batched[1].split().index(stop)
    short = lm.generate_until(requests([(prompts[0], {"until": [], "max_gen_toks": 2})], "generate_until"))[0]
    assert len(tok.encode(short)) <= 2


def test_eval_tasks_writes_lm_evals_results_beside_ours(converted, tasks, tmp_path, capsys):
    _, dlm = converted("llama")
    out = tmp_path / "r.json"
    assert main(["eval", str(dlm), "--tasks", "toy_mc,toy_gen,toy_roll", "--include-path", str(tasks), "--limit",
                 "2", "--mc-samples", "2", "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = printed["lm_eval"]["results"]
    assert set(results) == {"toy_mc", "toy_gen", "toy_roll"}
    # the numbers are lm-eval's own run of the backend with the same settings, answer by answer
    direct = run("dlm-adapt", tasks, ["toy_mc"], model_args={"pretrained": str(dlm), "mc_samples": 2}, limit=2)
    assert results["toy_mc"]["acc,none"] == direct["results"]["toy_mc"]["acc,none"]
    picks = [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0])
             for s in sorted(direct["samples"]["toy_mc"], key=lambda s: s["doc_id"])]
    golds = [s["target"] for s in sorted(direct["samples"]["toy_mc"], key=lambda s: s["doc_id"])]
    assert results["toy_mc"]["acc,none"] == sum(int(p == int(g)) for p, g in zip(picks, golds)) / 2
    full = json.loads((tmp_path / "r.lm_eval.json").read_text())
    assert full["results"] == results and full["config"]["model_args"] is None
    assert json.loads(out.read_text()) == printed


@pytest.mark.parametrize("args, message", [
    ({"mc_sample": 4}, "unknown model arg 'mc_sample' \\(known: batch_size, block_length"),
    ({"is_causal": True, "shift": False}, "cannot give causal loglikelihoods"),
    ({"source": True}, "is a causal LM, not a dlm-adapt checkpoint: score it with --model hf"),
])
def test_bad_model_args_are_one_clear_error(converted, tmp_path, args, message):
    src, dlm = converted("llama")
    pretrained = src if args.pop("source", False) else dlm
    if args.pop("shift", True) is False:
        pretrained = adapt.convert(src, tmp_path / "noshift", shift=False)
    with pytest.raises(AdaptError, match=message):
        DLMAdaptLM.create_from_arg_string(f"pretrained={pretrained}", args)


@pytest.mark.parametrize("flags, message", [
    (["--is-causal"], "--is-causal scores a diffusion checkpoint as its causal self; a causal LM already is one"),
    (["--mc-samples", "0"], "mc_samples must be at least 1"),
])
def test_eval_tasks_errors_are_one_line(converted, tasks, capsys, flags, message):
    src, _ = converted("llama")
    assert main(["eval", str(src), "--tasks", "toy_mc", "--include-path", str(tasks), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dlm-adapt: error: {message}" or (err.startswith(f"dlm-adapt: error: {message}") and "\n" not in err)


@pytest.fixture(scope="module")
def cli_index_once():
    """lm-eval's command line indexes all of its own task YAMLs (thousands, ~10 s here) on every run before it
    looks at the model; the index depends only on the directories, so runs in this module's process share one."""
    from lm_eval.tasks._index import TaskIndex

    built, build = {}, TaskIndex.build

    def once(paths, **kwargs):
        paths = list(paths)
        key = (tuple(map(str, paths)), tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build(paths, **kwargs)
        return dict(built[key])  # lm-eval deep-copies an entry's config before it changes one

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskIndex, "build", staticmethod(once))
        yield


def _cli_results(capsys, dlm, tasks, out, batch_size):
    from adapt.evaluation.lm_eval_backend import main as lm_eval_cli

    assert lm_eval_cli(["run", "--model", "dlm-adapt", "--model_args",
                        f"pretrained={dlm},mc_samples=2,batch_size={batch_size}", "--tasks", "toy_mc",
                        "--include_path", str(tasks), "--limit", "4", "--device", "cpu", "--output_path", str(out),
                        "--log_samples"]) == 0
    assert "dlm-adapt: error" not in capsys.readouterr().err
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob("samples_toy_mc_*.jsonl")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return json.loads(results.read_text()), [r["resps"] for r in rows]


@pytest.mark.slow
def test_batch_size_model_arg_runs_through_lm_evals_own_command_line(converted, tasks, tmp_path, capsys,
                                                                     cli_index_once):
    """lm-eval's command line passes its own batch_size (1 by default) beside the model args: the model arg wins,
    and the draws do not depend on it; a bad one is one line. (One test: each command-line run costs lm-eval's
    index of its own tasks, which its runs share, on one worker.)"""
    from adapt.evaluation.lm_eval_backend import main as lm_eval_cli

    _, dlm = converted("llama")
    four, four_samples = _cli_results(capsys, dlm, tasks, tmp_path / "four", 4)
    one, one_samples = _cli_results(capsys, dlm, tasks, tmp_path / "one", 1)
    assert four["results"]["toy_mc"] == one["results"]["toy_mc"] and len(four_samples) == 4
    assert four_samples == one_samples

    assert lm_eval_cli(["run", "--model", "dlm-adapt", "--model_args", f"pretrained={dlm},batch_size=-1",
                        "--tasks", "toy_mc", "--include_path", str(tasks), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dlm-adapt: error: model arg 'batch_size' must be in [1, inf), got -1"], err


def test_batch_size_beside_lm_evals_own_is_checked_and_wins(converted):
    _, dlm = converted("llama")
    # what lm-eval's command line hands over beside the model args (its own --batch_size, 1 by default)
    with pytest.raises(AdaptError, match="model arg 'batch_size' must be int, got 'auto' \\(batch_size: forward rows"):
        DLMAdaptLM.create_from_arg_string(f"pretrained={dlm},batch_size=auto", {"batch_size": 1, "device": None})
    lm = DLMAdaptLM.create_from_arg_obj({"pretrained": str(dlm), "batch_size": 4}, {"batch_size": 1})
    assert lm.batch_size_rows == 4
