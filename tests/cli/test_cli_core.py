"""The core commands end to end, and every bad input: one line, non-zero exit, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_slim.cli import main
from moe_slim.modeling.tiny import save_tiny

TEXTS = {
    "general": ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "all is well"],
    "code": ["def f(x):\n    return x * 2", "for i in range(10): print(i)", "import os, sys"],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    save_tiny("qwen3_moe", d / "model", seed=5)
    for dom, texts in TEXTS.items():
        (d / f"{dom}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    code = main(["observe", str(d / "model"), "--calib", f"general={d/'general.jsonl'},code={d/'code.jsonl'}",
                 "--out", str(d / "stats"), "--seq-len", "32", "--quiet"])
    assert code == 0
    return d


def _snapshot(path: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_observe_prune_reload_generate(workdir: Path, tmp_path: Path) -> None:
    before = _snapshot(workdir / "model")
    out = tmp_path / "pruned"
    code = main(["prune", str(workdir / "model"), "--stats", str(workdir / "stats"), "--criterion", "reap",
                 "--ratio", "0.5", "--mix", "code=1", "--out", str(out)])
    assert code == 0
    assert _snapshot(workdir / "model") == before, "the input checkpoint must not change"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 4
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def f", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]
    plan = json.loads((out / "plan.json").read_text())
    assert [len(l["keep"]) for l in plan["layers"]] == [4, 4]
    card = (out / "README.md").read_text()
    assert "reap" in card and "code=1" in card and "Parameters:" in card
    # the plan re-applies without statistics and gives the same weights
    out2 = tmp_path / "applied"
    assert main(["apply", str(workdir / "model"), "--plan", str(out / "plan.json"), "--out", str(out2)]) == 0
    m2 = AutoModelForCausalLM.from_pretrained(out2)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_global_budget_with_floor_and_explicit_budget(workdir: Path, tmp_path: Path) -> None:
    # global budgets may keep different counts per layer: refused as a checkpoint, with the reason
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps([6, 2]))
    run = lambda *extra: main(["prune", str(workdir / "model"), "--stats", str(workdir / "stats"),
                               "--ratio", "0.5", "--out", str(tmp_path / "o"), *extra])
    assert run("--budget", str(budget)) == 2
    assert not (tmp_path / "o").exists()
    budget.write_text(json.dumps([3, 3]))
    assert run("--budget", str(budget)) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.num_experts == 3


def _bad(capsys: pytest.CaptureFixture, argv: list[str], out: Path, match: str) -> None:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("moe-slim: "), err
    assert match in err, err
    assert not out.exists() or out.name == "exists"
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    assert not leftovers


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--ratio", "0"], "strictly between 0 and 1"),
        (["--ratio", "1.5"], "strictly between 0 and 1"),
        (["--ratio", "0.9"], "fewer than top-k"),
        (["--ratio", "0.5", "--criterion", "bogus"], "unknown criterion"),
        (["--ratio", "0.5", "--mix", "nosuch=1"], "no domain nosuch"),
        (["--ratio", "0.5", "--mix", "code=0"], "not all zero"),
    ],
)
def test_prune_bad_arguments(workdir: Path, tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    out = tmp_path / "out"
    _bad(capsys, ["prune", str(workdir / "model"), "--stats", str(workdir / "stats"), "--out", str(out), *extra],
         out, match)


def test_prune_bad_stats(workdir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    base = ["prune", str(workdir / "model"), "--ratio", "0.5", "--out", str(out), "--stats"]
    _bad(capsys, base + [str(tmp_path / "missing")], out, "not a stats directory")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "stats.safetensors").write_bytes(b"\x00" * 10)
    (corrupt / "meta.json").write_text("{")
    _bad(capsys, base + [str(corrupt)], out, "corrupt")
    other = tmp_path / "other"
    save_tiny("qwen3_moe", other, num_experts=16)
    _bad(capsys, ["prune", str(other), "--ratio", "0.5", "--out", str(out), "--stats", str(workdir / "stats")],
         out, "8 experts per layer; this model has 16")


def test_unsupported_and_non_moe_models(workdir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    dense = tmp_path / "llama"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(dense)
    _bad(capsys, ["prune", str(dense), "--stats", str(workdir / "stats"), "--ratio", "0.5", "--out", str(out)],
         out, "not a supported MoE family: no module holds experts")
    nomoe = tmp_path / "nomoe"
    save_tiny("qwen3_moe", nomoe, mlp_only_layers=[0, 1])
    _bad(capsys, ["observe", str(nomoe), "--calib", f"general={workdir/'general.jsonl'}", "--out", str(out)],
         out, "has no MoE layer")
    _bad(capsys, ["prune", str(tmp_path / "nothing"), "--stats", str(workdir / "stats"), "--ratio", "0.5",
                  "--out", str(out)], out, "does not exist")


def test_empty_calibration_and_existing_output(workdir: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    _bad(capsys, ["observe", str(workdir / "model"), "--calib", f"general={empty}", "--out", str(out)], out, "empty")
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "keep.txt").write_text("mine")
    _bad(capsys, ["prune", str(workdir / "model"), "--stats", str(workdir / "stats"), "--ratio", "0.5",
                  "--out", str(exists)], exists, "already exists")
    assert (exists / "keep.txt").read_text() == "mine"
    # --overwrite replaces only moe_slim's own outputs: a user's directory is refused even then
    _bad(capsys, ["prune", str(workdir / "model"), "--stats", str(workdir / "stats"), "--ratio", "0.5",
                  "--out", str(exists), "--overwrite"], exists, "is not a moe_slim output")
    assert (exists / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    for _ in range(2):  # the second run replaces the first one's output
        assert main(["prune", str(workdir / "model"), "--stats", str(workdir / "stats"), "--ratio", "0.5",
                     "--out", str(ours), "--overwrite", "--quiet"]) == 0
    assert (ours / "config.json").exists() and (ours / ".moe_slim").exists()


def test_criteria_help_lists_every_criterion() -> None:
    from moe_slim.cli.core import CRITERIA_HELP
    from moe_slim.experts.criteria import ALL_CRITERIA

    assert CRITERIA_HELP.split(", ") == list(ALL_CRITERIA)


def test_merge_cli_constants_mirror_the_merge_module() -> None:
    from moe_slim.cli import merge as cli_merge
    from moe_slim.experts.merge import methods as merge

    assert cli_merge.METHODS == merge.METHODS
    assert cli_merge.GROUPINGS == merge.GROUPINGS
    assert cli_merge.DEFAULT_ALIGN_TOKENS == merge.DEFAULT_ALIGN_TOKENS
    import typing

    from moe_slim.experts.merge.config import PRESETS, MergeOptions

    def allowed(field: str) -> tuple[str, ...]:
        lit = next(a for a in typing.get_args(MergeOptions.model_fields[field].annotation) if a is not type(None))
        return typing.get_args(lit)

    assert cli_merge.PRESETS == tuple(PRESETS)
    assert (cli_merge.WEIGHTINGS, cli_merge.CENTROIDS, cli_merge.PCAS) == (
        allowed("weighting"), allowed("centroids"), allowed("pca"))
    assert set(cli_merge.CHOICES) <= set(MergeOptions.model_fields)


def test_token_counts_parse_or_fail_in_one_line() -> None:
    from moe_slim.cli.common import _tokens
    from moe_slim.errors import MoeSlimError

    assert _tokens("200k") == 200_000 and _tokens("1.5M") == 1_500_000 and _tokens("5000") == 5000
    for bad in ("3x", "", "-5k", "0"):
        with pytest.raises(MoeSlimError):
            _tokens(bad)


def test_json_output_and_version(workdir: Path, tmp_path: Path, capsys) -> None:
    import json as _json

    capsys.readouterr()
    assert main(["prune", str(workdir / "model"), "--stats", str(workdir / "stats"), "--ratio", "0.5",
                 "--out", str(tmp_path / "p"), "--quiet", "--json"]) == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["kept_per_layer"] == [4, 4] and out["params_after"] < out["params_before"]
    assert main(["families", "--json"]) == 0
    rows = {f["model_type"]: f for f in _json.loads(capsys.readouterr().out)["families"]}
    assert rows["qwen3_moe"]["status"] == rows["nllb-moe"]["status"] == "tested end to end"
    assert rows["deepseek_v4"]["status"] == "tested end to end" and "hash" in rows["deepseek_v4"]["differs"]
    assert rows["jetmoe"]["status"] == "refused" and "num_local_experts" in rows["jetmoe"]["differs"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("moe-slim ")


def test_output_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`moe-slim data info --json | head -c 10`: the reader leaves early; no 'Broken pipe' line, exit 141."""
    (tmp_path / "manifest.json").write_text(json.dumps({"domains": {}, "warnings": ["x" * 100] * 5000}))
    proc = subprocess.Popen([sys.executable, "-m", "moe_slim", "data", "info", "--json", "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b'{\n  "data_'  # the output is far larger than the pipe's buffer
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""
