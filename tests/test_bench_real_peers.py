"""bench/real.py's table takes a peer's rows (bench/results/svdllm.json) beside rankdown's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.real import write

SETUP = {"model": "bench/models/smollm2-135m-instruct", "source_sha256": "ab" * 32, "examples": 200, "ppl_tokens": 8192}


def _row(method: str, ratio: float, em: float, code: float, **extra) -> dict:
    return {"task": "compare", "method": method, "allocate": "uniform", "ratio": ratio, "params": 1000,
            "achieved_ratio": ratio, "task_em": em, "code_ppl": code, "prose_ppl": 2 * code,
            "compress_seconds": 10.0, "peak_rss_mb": 500} | extra


def _results() -> dict:
    return {"setup": SETUP, "rows": [_row("dense", 0.0, 0.655, 10.0, peak_rss_mb=None), _row("whiten", 0.4, 0.68, 2748.0)]}


def test_peer_rows_share_the_table_after_rankdowns_methods(tmp_path: Path):
    peer = {"setup": SETUP, "rows": [_row("svd-llm", 0.4, 0.5, 9000.0, peer="SVD-LLM 1c1009a"),
                                     _row("svd-llm", 0.2, 0.6, 900.0, peer="SVD-LLM 1c1009a")]}
    (tmp_path / "svdllm.json").write_text(json.dumps(peer))
    write(_results(), tmp_path)
    lines = (tmp_path / "real.md").read_text().splitlines()
    methods = [line.split(" | ")[0].removeprefix("| ") for line in lines if line.startswith("| ") and " | 0." in line]
    assert methods == ["dense", "svd-llm", "whiten", "svd-llm"]  # by ratio, then rankdown's methods before peers
    assert any("SVD-LLM 1c1009a" in line for line in lines)
    assert (tmp_path / "real.png").is_file()


def test_peer_rows_scored_another_way_are_refused(tmp_path: Path):
    (tmp_path / "svdllm.json").write_text(json.dumps({"setup": SETUP | {"examples": 20}, "rows": []}))
    with pytest.raises(SystemExit, match="cannot share the table"):
        write(_results(), tmp_path)


def test_peer_rounds_merge_into_the_median_of_round_medians():
    """bench.peers times every row in rounds round-robin; a row's figure is the median of its rounds'
    medians, its extremes those of all runs, and no round is dropped."""
    from bench.peers import merge_rounds

    def timed(decode: float, low: float, high: float, rss: float, load: float) -> dict:
        spread = {"median": decode, "min": low, "max": high, "runs": 5}
        return {"ttft_ms": spread, "ttft_long_ms": spread, "decode_tokens_per_s": spread, "load_s": 1.0,
                "peak_rss_mb": rss, "import_rss_mb": 50.0, "load_average": [load, 1.0, 1.0, 1.0], "greedy": [1, 2]}

    merged = merge_rounds([timed(40, 38, 44, 600, 1.2), timed(60, 55, 70, 640, 1.9), timed(45, 41, 47, 610, 1.5)])
    decode = merged["decode_tokens_per_s"]
    assert decode["median"] == 45 and (decode["min"], decode["max"]) == (38, 70)
    assert decode["runs"] == 15 and decode["round_medians"] == [40, 60, 45]
    assert merged["peak_rss_mb"] == 640 and merged["load_average"][0] == 1.9 and merged["rounds"] == 3


def test_speedups_are_paired_by_round_within_a_precision_class(tmp_path: Path):
    """A rankdown row over the faster peer of its class (fp32 or any 4-bit layout) in each round, so a
    slow minute that slows every row cancels; a row with no peer of its class gets no ratio."""
    from bench.peers import paired_speedups, precision_class, write

    def row(name: str, runtime: str, precision: str, rounds: list[float]) -> dict:
        spread = {"median": sorted(rounds)[len(rounds) // 2], "min": min(rounds), "max": max(rounds), "runs": 15,
                  "round_medians": rounds}
        return {"name": name, "runtime": runtime, "precision": precision, "decode_tokens_per_s": spread,
                "ttft_ms": spread, "ttft_long_ms": spread, "load_s": 1.0, "peak_rss_mb": 600.0, "import_rss_mb": 50.0,
                "size_bytes": 2**20, "greedy_agree_with_transformers": 128, "threads": 2, "rounds": 3, "runs": 5,
                "load_average": [0.5, 0.5, 0.5, 1.0]}

    assert [precision_class(p) for p in ("fp32", "int4", "8da4w, emb 8w", "Q4_1 (as shipped)", "int8")] == [
        "fp32", "4-bit", "4-bit", "4-bit", "int8"]
    rows = [row("optimum-executorch", "et-hf", "8da4w, emb 8w", [200, 100, 210]),
            row("onnxruntime-genai builder", "genai", "int4", [150, 120, 150]),
            row("optimum-executorch", "et-hf", "fp32", [50, 50, 50]),
            # the second round a slow minute for optimum-executorch: onnxruntime-genai is the faster peer there
            row("rankdown b", "rankdown:executorch", "int4", [260, 156, 252]),
            row("rankdown b", "rankdown:executorch", "int8", [90, 90, 90])]
    (paired,) = paired_speedups(rows)
    assert paired["row"] == "rankdown b (executorch)" and paired["peers"] == ["optimum-executorch",
                                                                              "onnxruntime-genai builder"]
    assert paired["per_round"] == pytest.approx([1.3, 1.3, 1.2]) and paired["median"] == pytest.approx(1.3)
    assert paired["of_medians"] == pytest.approx(252 / 200)
    setup = {"threads": 2, "prompt_tokens": 32, "long_prompt_tokens": 128, "new_tokens": 128, "warmup": 1,
             "runs": 5, "rounds": 3, "uptime": "up"}
    write({"setup": setup, "rows": rows, "paired": [paired]}, tmp_path)
    assert ("| rankdown b (executorch) | int4 | optimum-executorch / onnxruntime-genai builder | 1.30 (1.20-1.30) | 1.26 | 3 |"
            in (tmp_path / "peers.md").read_text())


def test_a_bundles_onnx_folder_is_also_timed_in_onnxruntime_genai(tmp_path: Path):
    """bench/peers.py: an ONNX folder that onnxruntime-genai can open (genai_config.json) gets a
    second row run by the peers' own Generator opener; a .pte gets one row; the table names the runtime."""
    from bench.peers import bundle_rows

    (tmp_path / "onnx").mkdir()
    (tmp_path / "executorch").mkdir()
    for name in ("onnx/model.onnx", "onnx/model.onnx.data", "onnx/genai_config.json", "executorch/model.pte"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(json.dumps({"options": {"quantize": "int4"}}))
    rows = bundle_rows("b", tmp_path)
    assert [(r.name, r.runtime, r.precision) for r in rows] == [
        ("rankdown b", "rankdown:onnxruntime", "int4"), ("rankdown b (onnxruntime-genai)", "genai", "int4"),
        ("rankdown b", "rankdown:executorch", "int4")]
    assert rows[1].artifact == str(tmp_path / "onnx") and rows[1].venv == "project"
    (tmp_path / "onnx/genai_config.json").unlink()
    assert [r.runtime for r in bundle_rows("b", tmp_path)] == ["rankdown:onnxruntime", "rankdown:executorch"]
    # --cpp-runner: the .pte once more, in rankdown-et-runner, named so, sized by the same files
    native = bundle_rows("b", tmp_path, cpp_runner=True)
    assert [(r.name, r.runtime) for r in native] == [
        ("rankdown b", "rankdown:onnxruntime"), ("rankdown b", "rankdown:executorch"),
        ("rankdown b (rankdown-et-runner)", "rankdown-native:executorch")]
    assert native[2].artifact == native[1].artifact and native[2].weights == native[1].weights


def test_cpp_runner_also_times_the_optimum_executorch_ptes(tmp_path: Path):
    """--cpp-runner gives each optimum-executorch .pte a second row in rankdown-et-runner: the same
    artifact and size, run from the project's Python, exported by its own row (none of the others)."""
    from bench.peers import CPP_RUNNER, peer_cpp_rows, peer_rows

    rows = peer_rows(tmp_path / "model", tmp_path / "model.gguf", tmp_path / "work")
    native = peer_cpp_rows(rows)
    et = [r for r in rows if r.runtime == "et-hf"]
    assert [(r.name, r.precision) for r in native] == [(f"{r.name} (rankdown-et-runner)", r.precision) for r in et]
    assert len(native) == 2 and {r.runtime for r in native} == {CPP_RUNNER} and {r.venv for r in native} == {"project"}
    assert [r.artifact for r in native] == [r.artifact for r in et] and not any(r.export for r in native)


def test_peers_table_and_plot_name_each_rows_runtime(tmp_path: Path):
    """bench/peers.py writes peers.md and peers.png (decode speed against size, fp32 and 4-bit apart)."""
    from bench.peers import write

    def row(name: str, runtime: str, precision: str, decode: float, size_mib: float) -> dict:
        spread = {"median": decode, "min": decode - 5, "max": decode + 5, "runs": 5}
        return {"name": name, "runtime": runtime, "precision": precision, "decode_tokens_per_s": spread,
                "ttft_ms": spread, "ttft_long_ms": spread, "load_s": 1.0, "peak_rss_mb": 600.0, "import_rss_mb": 50.0,
                "size_bytes": int(size_mib * 2**20), "greedy_agree_with_transformers": 128, "threads": 2,
                "rounds": 3, "runs": 5, "load_average": [0.5, 0.5, 0.5, 1.0]}

    setup = {"threads": 2, "prompt_tokens": 32, "long_prompt_tokens": 128, "new_tokens": 128, "warmup": 1,
             "runs": 5, "rounds": 3, "uptime": "up"}
    rows = [row("optimum-executorch", "et-hf", "fp32", 107.1, 621.6),
            row("rankdown 40%", "rankdown:executorch", "fp32", 137.4, 351.7),
            row("rankdown 40%", "rankdown:onnxruntime", "int4", 214.0, 74.5)
            | {"task_quality": {"task": "compare", "examples": 200, "exact_match": 0.975}},
            row("rankdown 40%", "rankdown:executorch", "int4", 259.2, 65.2)  # kept from a run on other problems
            | {"task_quality": {"task": "compare", "examples": 50, "exact_match": 0.96}}]
    quality = {"task": "compare", "examples": 200, "reference_exact_match": 0.655}
    write({"setup": setup | {"quality": quality}, "rows": rows}, tmp_path)
    table = (tmp_path / "peers.md").read_text()
    assert "| rankdown 40% (executorch) | fp32 | 137.4 (132.4-142.4)" in table
    assert "| rankdown 40% (onnxruntime) | int4 |" in table and "| optimum-executorch | fp32 |" in table
    assert "compare exact match (200) |" in table and "transformers fp32 on the dense model: 65.5%" in table
    assert "| 128/128 | 97.5% | 2, 3x5 |" in table and "| 128/128 | - | 2, 3x5 |" in table
    assert "| 128/128 | 96.0% (compare, 50) | 2, 3x5 |" in table
    assert (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peer_answers_are_greedy_until_the_end_token_or_the_budget():
    """The quality pass's generation loop (it runs in each peer's venv) and `rankdown eval`'s judging rule."""
    from bench.peers import exact_match, greedy_answer

    class Counting:  # prompt -> its length; each next token -> the token + 1
        def first(self, ids):
            return len(ids)

        def next(self, token):
            return token + 1

    assert greedy_answer(Counting(), [7, 7, 7], budget=4, eos=None) == [3, 4, 5, 6]
    assert greedy_answer(Counting(), [7, 7, 7], budget=4, eos=5) == [3, 4]  # the end token is not kept
    assert greedy_answer(Counting(), [7], budget=4, eos=1) == []
    assert greedy_answer(Counting(), [7, 7], budget=0, eos=None) == []  # no budget: no token, and it stops
    assert exact_match([" 58\nmax(1, 2) =", "59", "4 7"], ["58", "59", "4"]) == 2 / 3


def test_a_bench_table_names_the_cpu_and_the_extensions_its_kernels_are_picked_by(tmp_path: Path):
    """The int4 layouts rank differently by CPU (per channel 1.77x groups of 32 on AVX2, 1.20x with VNNI),
    so bench tables say which CPU and which of those extensions they ran on."""
    from bench.host import cpu_description
    from bench.peers import write

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                   "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n\n")
    assert cpu_description(x86) == "AMD EPYC 9R14 (family 25, model 17; avx2, avx512f, avx512_vnni)"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU part\t: 0xd4b\n")
    assert cpu_description(arm).startswith("0xd4b (") and cpu_description(arm).endswith("; asimddp, i8mm)")
    assert cpu_description(tmp_path / "absent") == "unknown CPU"

    setup = {"threads": 2, "prompt_tokens": 32, "long_prompt_tokens": 128, "new_tokens": 128, "warmup": 1,
             "runs": 5, "rounds": 3, "uptime": "up", "cpu": cpu_description(x86)}
    write({"setup": setup, "rows": []}, tmp_path / "out")
    assert "2 threads on AMD EPYC 9R14 (family 25, model 17; avx2, avx512f, avx512_vnni)," in (
        tmp_path / "out" / "peers.md").read_text()


def test_an_interleaved_ab_is_summarized_by_its_per_round_ratios():
    """bench/pte_ab.py: B over A round by round, so a slow round for both does not count against B."""
    from bench.pte_ab import summary

    s = summary([100, 50, 100, 100], [110, 55, 99, 120])
    assert s["ratio"] == pytest.approx(1.1) and s["b_faster"] == 3 and s["rounds"] == 4
    assert s["a"] == 100 and s["b"] == pytest.approx(104.5)


def test_a_thread_sweep_times_every_row_at_each_count_against_the_faster_peer_at_any():
    """bench.peers --threads 1,2: each row once per count, named for it; a rankdown row is paired with
    the fastest peer row of its class whatever its count, so a peer faster at 2 threads than at 1 is
    met at 2. One count keeps the rows' names."""
    import argparse

    from bench.peers import Row, at_thread_counts, paired_speedups, thread_counts

    assert thread_counts("2") == (2,) and thread_counts("1,2") == (1, 2)
    for bad in ("0", "1,1", "two", "1,"):
        with pytest.raises(argparse.ArgumentTypeError):
            thread_counts(bad)
    rows = [Row("onnxruntime-genai builder", "genai", "int4", "genai", "g"),
            Row("rankdown b", "rankdown:executorch", "int4", "project", "b.pte")]
    assert [(r.name, r.threads) for r in at_thread_counts(rows, (1,))] == [
        ("onnxruntime-genai builder", 1), ("rankdown b", 1)]
    swept = at_thread_counts(rows, (1, 2))
    assert [(r.name, r.threads) for r in swept] == [
        ("onnxruntime-genai builder, 1 thread", 1), ("onnxruntime-genai builder, 2 threads", 2),
        ("rankdown b, 1 thread", 1), ("rankdown b, 2 threads", 2)]

    def timed(row: Row, rounds: list[float]) -> dict:
        spread = {"median": sorted(rounds)[len(rounds) // 2], "round_medians": rounds}
        return {"name": row.name, "runtime": row.runtime, "precision": row.precision, "decode_tokens_per_s": spread}

    # the peer is faster at 2 threads, the bundle at 1
    results = [timed(swept[0], [180, 170, 190]), timed(swept[1], [250, 240, 260]),
               timed(swept[2], [350, 360, 338]), timed(swept[3], [300, 290, 312])]
    paired = {p["row"]: p for p in paired_speedups(results)}
    assert paired["rankdown b, 1 thread (executorch)"]["per_round"] == pytest.approx([1.4, 1.5, 1.3])
    assert paired["rankdown b, 2 threads (executorch)"]["per_round"] == pytest.approx([1.2, 290 / 240, 1.2])
    assert paired["rankdown b, 1 thread (executorch)"]["peers"] == ["onnxruntime-genai builder, 1 thread",
                                                                     "onnxruntime-genai builder, 2 threads"]
