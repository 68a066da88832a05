import pytest

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint
from rankdown.evaluate import EvalConfig, evaluate, greedy_answers, perplexity
from rankdown.tasks import QAExample, Split, load_task


def test_batched_greedy_answers_equal_one_at_a_time(tiny_model_dir):
    """Left padding must not change a prompt's greedy continuation."""
    model = load_model(open_checkpoint(tiny_model_dir))
    tok = load_tokenizer(tiny_model_dir)
    qa = tuple(QAExample(p, "123") for p in ("1+1=", "45+67=", "9-3=", "88+12="))
    assert greedy_answers(model, tok, qa, batch_size=4) == [greedy_answers(model, tok, (q,), 1)[0] for q in qa]


def test_perplexity_is_independent_of_batching(tiny_model_dir):
    model = load_model(open_checkpoint(tiny_model_dir))
    tok = load_tokenizer(tiny_model_dir)
    texts = load_task("prose", Split.EVALUATION).texts[:3]
    one, n1 = perplexity(model, tok, texts, EvalConfig(batch_size=1, max_tokens=2000))
    many, n2 = perplexity(model, tok, texts, EvalConfig(batch_size=8, max_tokens=2000))
    assert n1 == n2 and one == pytest.approx(many, rel=1e-4)


@pytest.mark.slow
def test_shipped_model_reaches_its_dense_figures(shipped_model_dir):
    """The model card's figures (rankdown eval --task math): exact match 98.2%."""
    model = load_model(open_checkpoint(shipped_model_dir))
    tok = load_tokenizer(shipped_model_dir)
    result = evaluate(model, tok, load_task("math", Split.EVALUATION))
    assert result.exact_match >= 0.6
    assert result.exact_match == pytest.approx(0.982, abs=0.005)
    assert result.perplexity < 6
