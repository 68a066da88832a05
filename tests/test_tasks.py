from rankdown.tasks import Split, load_task, math_problems


def test_math_splits_are_disjoint_and_deterministic():
    train = {p.prompt for p in math_problems(Split.TRAIN)}
    calib = {p.prompt for p in math_problems(Split.CALIBRATION)}
    evaluation = math_problems(Split.EVALUATION)
    assert not train & calib and not train & {p.prompt for p in evaluation}
    assert evaluation == math_problems(Split.EVALUATION)
    assert all(str(eval(p.prompt[:-1])) == p.answer for p in evaluation[:50])


def test_code_and_prose_splits_share_no_text():
    for task in ("code", "prose"):
        train = set(load_task(task, Split.TRAIN).texts)
        held_out = set(load_task(task, Split.EVALUATION).texts) | set(load_task(task, Split.CALIBRATION).texts)
        assert train and held_out and not train & held_out


def test_math_evaluation_has_question_answer_pairs():
    data = load_task("math", Split.EVALUATION)
    assert len(data.qa) == 400 and data.texts
