import pytest

from rankdown.tasks import FEW_SHOT_EXAMPLES, Split, load_task, math_problems


def test_math_splits_are_pairwise_disjoint_and_deterministic():
    train = {p.prompt for p in math_problems(Split.TRAIN)}
    calib = {p.prompt for p in math_problems(Split.CALIBRATION)}
    evaluation = math_problems(Split.EVALUATION)
    held = {p.prompt for p in evaluation}
    assert train and calib and held
    assert not train & calib and not train & held and not calib & held
    assert evaluation == math_problems(Split.EVALUATION)
    assert all(str(eval(p.prompt[:-1])) == p.answer for p in evaluation[:50])


@pytest.mark.parametrize("task", ["math", "code", "prose", "compare", "identifiers"])
def test_no_two_splits_share_a_text(task):
    train, calib, evaluation = (set(load_task(task, split).texts) for split in (Split.TRAIN, Split.CALIBRATION, Split.EVALUATION))
    assert train and calib and evaluation
    assert not train & calib and not train & evaluation and not calib & evaluation


def test_math_evaluation_has_question_answer_pairs():
    data = load_task("math", Split.EVALUATION)
    assert len(data.qa) == 400 and data.texts


def _question(prompt: str) -> str:
    return prompt.rsplit("\n", 1)[-1]


@pytest.mark.parametrize("task", ["compare", "identifiers"])
def test_few_shot_questions_are_never_in_calibration_or_training(task):
    evaluation = load_task(task, Split.EVALUATION)
    held = {_question(ex.prompt) for ex in evaluation.qa}
    for split in (Split.TRAIN, Split.CALIBRATION):
        lines = {line.rsplit(" ", 1)[0] for text in load_task(task, split).texts for line in text.splitlines()}
        assert lines and not held & lines, f"{task} {split.value}"
    shots = evaluation.qa[0].prompt.splitlines()[:-1]
    assert len(shots) == FEW_SHOT_EXAMPLES and not {s.rsplit(" ", 1)[0] for s in shots} & held


@pytest.mark.parametrize("task", ["compare", "identifiers"])
def test_few_shot_tasks_are_deterministic_with_answers(task):
    first, again = load_task(task, Split.EVALUATION), load_task(task, Split.EVALUATION)
    assert first == again and len(first.qa) >= 200
    assert all(ex.answer and ex.answer == ex.answer.strip() and "\n" not in ex.answer for ex in first.qa)


def test_few_shot_answers_are_right():
    for ex in load_task("compare", Split.EVALUATION).qa[:50]:
        a, b = map(int, _question(ex.prompt)[len("max("):-len(") =")].split(", "))
        assert ex.answer == str(max(a, b))
    for ex in load_task("identifiers", Split.EVALUATION).qa[:50]:
        name = _question(ex.prompt)[: -len(" ->")]
        assert "_" in name and ex.answer.lower() == name.replace("_", "") and ex.answer[0].isupper()
