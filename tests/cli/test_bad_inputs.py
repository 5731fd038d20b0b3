"""Every command, every kind of bad input: one ``moe-slim:`` line on stderr, exit status 2, nothing written,
the inputs unchanged (hashed before and after)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from eval_fixtures import write_fixture_data

from moe_slim.cli import main
from moe_slim.experts.plan import ExpertPlan, LayerPlan
from moe_slim.families import moe_layers
from moe_slim.modeling.tiny import save_tiny, tiny_model, tiny_tokenizer


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    model = save_tiny("qwen3_moe", root / "model", seed=1, max_position_embeddings=1024)
    other = save_tiny("mixtral", root / "other", seed=1)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"some words, number {i}"}) + "\n" for i in range(12)))
    (root / "empty.jsonl").write_text("")
    assert main(["observe", str(model), "--calib", f"general={calib}", "--out", str(root / "stats"), "--seq-len", "16",
                 "--quiet", "--no-layerwise"]) == 0
    assert main(["observe", str(other), "--calib", f"general={calib}", "--out", str(root / "other-stats"),
                 "--seq-len", "16", "--quiet", "--no-layerwise"]) == 0
    layers = moe_layers(tiny_model("qwen3_moe"))
    ExpertPlan("qwen3_moe", 8, 2, [LayerPlan(l.name, [0, 1, 2, 3]) for l in layers]).save(root / "plan.json")
    ExpertPlan("mixtral", 8, 2, [LayerPlan(l.name, [0, 1, 2, 3]) for l in layers]).save(root / "mixtral-plan.json")
    (root / "garbage.json").write_text("{not json")
    corrupt = root / "corrupt-stats"
    shutil.copytree(root / "stats", corrupt)
    (corrupt / "meta.json").write_text("{")
    truncated = root / "truncated"
    shutil.copytree(model, truncated)
    st = truncated / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-64])
    pickled = root / "pickled"
    tiny_model("qwen3_moe").config.save_pretrained(str(pickled))
    tiny_tokenizer().save_pretrained(str(pickled))
    torch.save({}, pickled / "pytorch_model.bin")
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = root / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(str(dense))
    data = write_fixture_data(root / "data", n_per_domain=4, splits=("test", "calibration", "train", "validation"))
    spec = {"model": str(model), "data_dir": str(data), "calibration": {"domains": ["general"], "texts_per_domain": 2,
            "seq_len": 16}, "mixes": [{"general": 1}], "methods": ["reap"], "ratios": [0.5],
            "eval": {"tasks": ["perplexity"], "limit": 1}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    (root / "badspec.yaml").write_text(yaml.safe_dump({**spec, "colour": "red"}))
    (root / "afile").write_text("I am a file")
    (root / "task2.jsonl").write_text("".join(json.dumps({"text": f"a text {i}", "label": "ab"[i % 2]}) + "\n"
                                              for i in range(12)))
    (root / "onecls.jsonl").write_text("".join(json.dumps({"text": f"a text {i}", "label": "a"}) + "\n"
                                               for i in range(12)))
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("do not delete")
    userdb = root / "userdb"  # a directory of the user's that happens to hold a file named results.db
    userdb.mkdir()
    (userdb / "results.db").write_text("my own database")
    (userdb / "notes.txt").write_text("mine")
    ckpt = root / "ckpt"  # a finished checkpoint moe_slim wrote
    shutil.copytree(model, ckpt)
    (ckpt / ".moe_slim").write_text(json.dumps({"written_by": "moe_slim", "kind": "checkpoint"}))
    ref = root / "refmodel"  # the reference model, as shipped in models/reference
    shutil.copytree(model, ref)
    (ref / ".moe_slim").write_text(json.dumps({"written_by": "moe_slim", "kind": "reference"}))
    (ref / "training.json").write_text("{}")
    (root / "link").symlink_to(ckpt)  # a link to an output: replacing it would replace the link, not the output
    legacy = root / "legacy"  # an older version's output whose kind cannot be told
    legacy.mkdir()
    (legacy / ".moe_slim").write_text(json.dumps({"written_by": "moe_slim"}))
    (legacy / "notes.txt").write_text("?")
    (root / "badcache" / "debs").mkdir(parents=True)
    (root / "badcache" / "debs" / "a2ps_4.14-7_amd64.deb").write_bytes(b"not an ar archive" * 8)
    (root / "seedspec.yaml").write_text(yaml.safe_dump({**spec, "seed": 10**400}))
    recipe = {"model": str(model), "data_dir": str(data), "stats": str(root / "stats"), "prune": {"ratio": 0.5}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "otherrecipe.yaml").write_text(yaml.safe_dump({**recipe, "stats": str(root / "other-stats")}))
    (root / "bigrecipe.yaml").write_text(yaml.safe_dump({**recipe, "stats": None, "observe": {
        "calib": f"general={calib}", "seq_len": 10**29}}))
    names = ("model", "other", "calib", "stats", "other-stats", "corrupt-stats", "plan.json", "mixtral-plan.json",
             "garbage.json", "truncated", "pickled", "dense", "data", "spec.yaml", "badspec.yaml", "afile", "mine",
             "userdb", "ckpt", "refmodel", "legacy", "link", "badcache", "seedspec.yaml", "recipe.yaml", "otherrecipe.yaml",
             "bigrecipe.yaml")
    return {"root": str(root), **{n.replace("-", "_").replace(".", "_"): str(root / n) for n in names},
            "empty": str(root / "empty.jsonl"), "calib": str(calib), "task2": str(root / "task2.jsonl"),
            "onecls": str(root / "onecls.jsonl")}


# (command line with {placeholders}, what the one line must say); {out} is a fresh path that must stay absent
CASES: list[tuple[str, str]] = [
    # observe
    ("observe {root}/nothing --calib general={calib} --out {out}", "does not exist"),
    ("observe {data} --calib general={calib} --out {out}", "has no config.json"),
    ("observe {model} --calib general={empty} --out {out}", "is empty"),
    ("observe {model} --calib general={root}/missing.jsonl --out {out}", "not found"),
    ("observe {model} --calib general={calib} --out {out} --seq-len 0", "argument --seq-len: must be a positive integer"),
    ("observe {model} --calib general={calib} --out {out} --batch-size x", "argument --batch-size: 'x' is not"),
    ("observe {model} --calib general={calib} --out {model}/stats", "lies inside the input"),
    ("observe {model} --calib general={calib} --out {model} --overwrite", "is the input"),
    ("observe {model} --calib general={calib} --out {afile}/stats", "is a file, not a directory"),
    ("observe {model} --calib general={calib} --out {stats}", "already exists"),
    ("observe {model} --calib general={calib} --out {mine} --overwrite", "is not a moe_slim output"),
    ("observe {dense} --calib general={calib} --out {out}", "is not a supported MoE family"),
    ("observe {model} --calib general={calib} --out {out} --device cuda", "no CUDA GPU"),
    ("observe {model} --calib general={calib} --out {out} --dtype int4", "unknown dtype"),
    ("observe {pickled} --calib general={calib} --out {out} --no-layerwise", "holds only pickled weights"),
    ("observe {model} --calib general={calib} --out {out} --max-tokens lots", "is not a token count"),
    # prune
    ("prune {model} --stats {stats} --ratio 1.5 --out {out}", "argument --ratio: must be a share strictly between"),
    ("prune {model} --stats {stats} --ratio abc --out {out}", "argument --ratio: 'abc' is not"),
    ("prune {model} --stats {stats} --ratio 0.5 --criterion magic --out {out}", "unknown criterion"),
    ("prune {model} --stats {other_stats} --ratio 0.5 --out {out}", "stats were gathered on"),
    ("prune {model} --stats {corrupt_stats} --ratio 0.5 --out {out}", "are corrupt"),
    ("prune {model} --stats {root}/nowhere --ratio 0.5 --out {out}", "is not a stats directory"),
    ("prune {model} --stats {stats} --ratio 0.5 --out {model} --overwrite", "is the input"),
    ("prune {model} --stats {stats} --ratio 0.5 --out {stats}/pruned", "lies inside the input"),
    ("prune {model} --stats {stats} --ratio 0.5 --budget {root}/counts.yaml --out {out}", "budget file"),
    ("prune {model} --stats {stats} --ratio 0.5 --dtype int8 --out {out}", "unknown dtype"),
    ("prune {model} --stats {stats} --ratio 0.5 --max-shard-size big --out {out}", "is not a size"),
    ("prune {model} --stats {stats} --ratio 0.9 --out {out}", "fewer than top-k"),
    # apply
    ("apply {model} --plan {root}/noplan.json --out {out}", "does not exist"),
    ("apply {model} --plan {garbage_json} --out {out}", "not valid JSON"),
    ("apply {model} --plan {mixtral_plan_json} --out {out}", "plan is for family mixtral"),
    ("apply {truncated} --plan {plan_json} --out {out}", "is truncated"),
    ("apply {model} --plan {plan_json} --out {root}", "contains the input"),
    ("apply {other} --plan {plan_json} --out {out}", "plan is for family qwen3_moe"),
    # merge
    ("merge {model} --stats {stats} --out {out}", "needs --ratio"),
    ("merge {model} --stats {stats} --ratio 0.5 --method blend --out {out}", "unknown merge method"),
    ("merge {model} --stats {stats} --ratio 0.5 --out {out}", "no token samples"),
    ("merge {model} --stats {stats} --ratio 0.5 --group-size 0 --out {out}", "argument --group-size"),
    ("merge {model} --plan {plan_json} --out {out}", "not a moe_slim merge plan"),
    # eval
    ("eval {model} --suite gigantic --data {data} --out {out}.json", "unknown suite"),
    ("eval {model} --tasks nonsense_task --data {data} --out {out}.json", "nonsense_task"),
    ("eval {root}/nothing --data {data} --out {out}.json", "does not exist"),
    ("eval {model} --tasks perplexity --limit 0 --data {data} --out {out}.json", "argument --limit"),
    ("eval {model} --tasks perplexity --data {data} --out {model}/results.json", "lies inside the input"),
    ("eval {model} --tasks perplexity --data {root}/nodata --out {out}.json", "does not exist"),
    # sft
    ("sft {model} --data translation=1 --steps 0 --out {out}", "argument --steps"),
    ("sft {model} --data translation=1 --steps 2 --mode everything --out {out}", "argument --mode"),
    ("sft {model} --data translation=1 --steps 2 --lora-dropout 1.5 --out {out}", "argument --lora-dropout"),
    ("sft {model} --data translation=1 --steps 2 --out {model} --overwrite", "is the input"),
    # sweep and report
    ("sweep {root}/nospec.yaml --out {out}", "does not exist"),
    ("sweep {badspec_yaml} --out {out}", "colour"),
    ("sweep {spec_yaml} --jobs 0 --out {out}", "argument --jobs"),
    ("sweep {spec_yaml} --out {model}", "is the input"),
    ("sweep {spec_yaml} --out {data}/sweep", "lies inside the input"),
    ("report {root}/noresults.db --out {out}", "results"),
    # probe and slim-dense (ProbScale)
    ("probe {dense} --tasks {onecls} --budget 0.5 --out {out}", "has 1 label"),
    ("probe {dense} --tasks {task2} --budget 0.5 --folds 10 --out {out}", "10-fold cross-validation needs"),
    ("probe {dense} --tasks {task2} --budget 1.0 --scaling off --out {out}", "keeps every layer"),
    ("probe {dense} --tasks {task2} --budget x1 --scaling off --out {out}", "keeps every layer"),
    ("probe {dense} --tasks {task2} --budget 0.1 --scaling off --out {out}", "below one layer"),
    ("probe {dense} --tasks {task2} --budget 0.5 --folds 1 --out {out}", "at least 2 folds"),
    ("slim-dense {dense} --plan {garbage_json} --out {out}", "not valid JSON"),
    ("slim-dense {dense} --plan {garbage_json} --out {dense}/slim", "lies inside the input"),
    ("slim-dense {dense} --plan {garbage_json} --out {out} --heal -3", "argument --heal"),
    # data, stats, reference, verbs
    ("data build --out {out} --domains poetry", "poetry"),
    ("data build --out {model} --overwrite", "is not a moe_slim output"),
    ("stats {root}/nowhere", "is not a stats directory"),
    ("train-reference --out {out} --steps 0", "argument --steps"),
    ("train-reference --out {out} --data {root}/nodata", "no "),
    ("reference-card {root}/nothing", "does not exist"),
    ("frobnicate", "invalid choice"),
]


# The output rule (moe_slim.outputs), for every command that writes: (base line with {o}, the kind it writes)
WRITERS: dict[str, tuple[str, str]] = {
    "observe": ("observe {model} --calib general={calib} --out {o}", "stats"),
    "prune": ("prune {model} --stats {stats} --ratio 0.5 --out {o}", "checkpoint"),
    "prune-plan": ("prune {model} --stats {stats} --ratio 0.5 --plan-only --out {o}", "plan"),
    "apply": ("apply {model} --plan {plan_json} --out {o}", "checkpoint"),
    "merge": ("merge {model} --stats {stats} --ratio 0.5 --out {o}", "checkpoint"),
    "mone": ("mone {model} --stats {stats} --ratio 0.5 --out {o}", "checkpoint"),
    "probe": ("probe {dense} --tasks {task2} --budget 0.5 --out {o}", "probe"),
    "slim-dense": ("slim-dense {dense} --plan {garbage_json} --out {o}", "checkpoint"),
    "sft": ("sft {model} --data translation=1 --steps 2 --out {o}", "checkpoint"),
    "train-reference": ("train-reference --data {data} --out {o}", "reference"),
    "data": ("data build --domains math --out {o}", "data"),
    "run": ("run {recipe_yaml} --out {o}", "checkpoint"),
    "report": ("report {root}/noresults.db --out {o}", "report"),
}
KIND_SAYS = {"checkpoint": "is a model checkpoint", "stats": "is a router statistics directory"}
GUARD: list[tuple[str, str]] = []
for _name, (_base, _kind) in WRITERS.items():
    _other = "{other_stats}" if _kind != "stats" else "{ckpt}"
    _not_ref = "{refmodel} --overwrite" if _kind != "reference" else "{ckpt} --overwrite"
    for _o, _says in (("{afile}/x", "is a file, not a directory"), ("{ro}/x", "cannot write"),
                      ("{mine}", "already exists"), ("{mine} --overwrite", "is not a moe_slim output"),
                      ("{userdb} --overwrite", "is not a moe_slim output"),
                      (_not_ref, "a reference model (as the shipped" if _kind != "reference" else "is a model checkpoint"),
                      (f"{_other} --overwrite", KIND_SAYS["stats" if _kind != "stats" else "checkpoint"]),
                      ("{legacy} --overwrite", "of a kind this version does not know")):
        GUARD.append((_base.replace("{o}", _o), _says))
GUARD += [(f"eval {{model}} --tasks perplexity --data {{data}} --out {o}", says) for o, says in (
    ("{afile}/x.json", "is a file, not a directory"), ("{ro}/x.json", "cannot write"), ("{afile}", "already exists"),
    ("{afile} --overwrite", "is not a moe_slim output"), ("{userdb}/results.db --overwrite", "is not a moe_slim output"),
    ("{refmodel} --overwrite", "a reference model"), ("{ckpt} --overwrite", "is a model checkpoint"))]
GUARD += [(f"sweep {{spec_yaml}} --out {o}", says) for o, says in (
    ("{afile}/x", "is a file, not a directory"), ("{ro}/x", "cannot write"), ("{afile}", "is not a directory"),
    ("{mine}", "a directory that moe_slim did not write"), ("{userdb}", "a directory that moe_slim did not write"),
    ("{ckpt}", "is a model checkpoint, not a sweep directory"), ("{stats}", "is a router statistics directory"))]

# every integer and number option: a value far beyond any sensible one is refused in one line, never run
HUGE, NOT_A_NUMBER = "1" + "0" * 30, "1e400"
BASES = {"observe": "observe {model} --calib general={calib} --out {out}",
         "prune": "prune {model} --stats {stats} --ratio 0.5 --out {out}",
         "eval": "eval {model} --tasks perplexity --data {data} --out {out}.json",
         "probe": "probe {dense} --tasks {task2} --budget 0.5 --out {out}",
         "slim-dense": "slim-dense {dense} --plan {garbage_json} --out {out}",
         "merge": "merge {model} --stats {stats} --ratio 0.5 --out {out}",
         "train-reference": "train-reference --data {data} --out {out}",
         "reference-card": "reference-card {model}",
         "sweep": "sweep {spec_yaml} --out {out}",
         "sft": "sft {model} --data translation=1 --steps 2 --out {out}"}
NUMBERS: dict[str, tuple[str, ...]] = {
    "observe": ("--seq-len", "--batch-size"), "prune": ("--floor", "--seed"),
    "eval": ("--limit", "--batch-size", "--mc-batch-size", "--seq-len"),
    "probe": ("--per-class", "--seed", "--max-length", "--batch-size", "--folds", "--mc-limit", "--heal"),
    "slim-dense": ("--heal", "--seed"), "merge": ("--group-size", "--pca-dims", "--seq-len", "--batch-size", "--seed"),
    "train-reference": ("--steps", "--dense-steps", "--threads", "--seed"),
    "reference-card": ("--translation-per-pair",), "sweep": ("--jobs", "--max-points"),
    "sft": ("--steps", "--batch-size", "--grad-accum", "--seq-len", "--eval-every", "--val-examples", "--patience",
            "--chrf-limit", "--lora-r", "--lora-alpha", "--seed")}
ARGS: list[tuple[str, str]] = [(f"{BASES[c]} {opt} {HUGE}", f"argument {opt}") for c, opts in NUMBERS.items()
                               for opt in opts]
ARGS += [(f"{BASES[c]} {opt} {NOT_A_NUMBER}", f"argument {opt}") for c, opt in (
    ("slim-dense", "--heal-lr"), ("train-reference", "--max-minutes"), ("sft", "--lr"), ("sft", "--max-minutes"),
    ("sft", "--weight-decay"))]
ARGS += [(f"{BASES[c]} {opt} nonsense", f"argument {opt}: invalid choice") for c, opt in (
    ("probe", "--selection"), ("probe", "--pooling"), ("probe", "--model-eval"), ("slim-dense", "--heal-mode"),
    ("merge", "--router-row"), ("merge", "--align"), ("merge", "--weighting"), ("merge", "--dominants"),
    ("sft", "--scheduler"), ("sft", "--mode"))]
ARGS += [(line, "required") for line in (
    "observe {model} --out {out}", "prune {model} --ratio 0.5 --out {out}", "apply {model} --out {out}",
    "mone {model} --stats {stats} --out {out}", "run {recipe_yaml}", "report", "stats", "data", "eval",
    "probe {dense} --budget 0.5 --out {out}", "sft {model} --steps 2 --data x=1",
    "merge --out {out}", "sweep")]
ARGS += [("slim-dense {dense} --out {out}", "give --plan (a probe plan.json) or --task")]  # one of the two is needed
ARGS += [("reference-card {mine}", "not a checkpoint moe_slim wrote"), ("reference-card {afile}", "does not exist"),
         ("families --colour", "unrecognized arguments: --colour"), ("stats {afile}", "is not a stats directory"),
         ("data info --data-dir {root}/nodata", "manifest.json not found"), ("data frob", "invalid choice: 'frob'"),
         ("data build --out {out} --seed -1", "argument --seed"), ("data build --out {out} --packages nano", "reserved")]

# the exact cases of issue 29
ISSUE: list[tuple[str, str]] = [
    ("prune {model} --stats {stats} --out {userdb} --ratio 0.5 --overwrite", "is not a moe_slim output"),  # 1
    ("report {root}/noresults.db --out {ckpt}", "already exists"),  # 2
    ("report {root}/noresults.db --out {ckpt} --overwrite", "is a model checkpoint; --overwrite replaces only a sweep report"),
    ("data build --domains math --out {shipped} --overwrite",  # 4
     "is a reference model (as the shipped models/reference) that only train-reference replaces"),
    ("data build --domains math --out {refmodel} --overwrite", "only train-reference replaces"),
    ("sweep {spec_yaml} --out {mine}", "is a directory that moe_slim did not write"),  # 5
    ("data build --packages a2ps --no-download --cache-dir {badcache} --out {out}", "is not a readable Debian package"),  # 8
    ("train-reference --device cuda --data {data} --out {out}", "no CUDA GPU"),  # 9
    ("run {otherrecipe_yaml} --out {out}", "stats were gathered on"),  # 11: and no .out.run left beside it
    ("sweep {seedspec_yaml} --out {out}", "seed must be an integer <= 2147483647"),  # 12
    ("run {bigrecipe_yaml} --out {out}", "observe.seq_len must be an integer <= 1048576"),
    ("observe {model} --calib general={calib} --out {out} --seq-len 100000000000000000000000000000", "at most"),
    ("observe {model} --calib general={calib} --out {out} --max-tokens 1e29", "token count must be at most"),
    ("prune {model} --stats {stats} --ratio 0.5 --out {link} --overwrite", "is a symbolic link"),
]
ALL = CASES + GUARD + ARGS + ISSUE


@pytest.fixture(scope="module")
def ro(w) -> str | None:
    """A read-only directory: a tmpfs mounted read-only (root can write anywhere else), or mode 0555."""
    path = Path(w["root"]) / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield str(path)
        path.chmod(0o755)
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        print(f"read-only cases skipped: mount not permitted here ({proc.stderr.strip()})")
        yield None
        return
    yield str(path)
    subprocess.run(["umount", str(path)], check=True)


SHIPPED = Path(__file__).resolve().parents[2] / "models" / "reference"


@pytest.mark.parametrize("line, says", ALL, ids=[f"{i:03d}-{c[0].split()[0]}" for i, c in enumerate(ALL)])
def test_bad_input_is_one_line_exit_2_nothing_written(w, ro, tmp_path, capsys, line: str, says: str) -> None:
    if "{ro}" in line and ro is None:
        pytest.skip("mounting a read-only tmpfs is not permitted here (CI runs as root)")
    if "--device cuda" in line and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the command would train")
    if "{shipped}" in line and not (SHIPPED / ".moe_slim").is_file():
        pytest.skip("no shipped reference model in this checkout")
    shipped_before = tree_hash(SHIPPED) if "{shipped}" in line else None
    out = tmp_path / "out"
    argv = line.format(**w, out=out, ro=ro, shipped=SHIPPED).split()
    before = tree_hash(Path(w["root"]))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (line, err)
    assert len(err) == 1 and err[0].startswith("moe-slim: "), err
    assert says in err[0], err[0]
    assert not list(tmp_path.iterdir()), f"something was written: {list(tmp_path.iterdir())}"
    assert tree_hash(Path(w["root"])) == before, "an input changed"
    assert not [p for p in Path(w["root"]).rglob(".*.tmp-*")], "a temporary file was left"
    if shipped_before is not None:
        assert tree_hash(SHIPPED) == shipped_before, "the shipped model changed"


@pytest.mark.parametrize("line", [
    "prune {model} --stats {stats} --ratio abc --out {out}",
    "prune {model} --stats {stats} --ratio 0.5 --out {model} --overwrite",
    "observe {model} --calib general={calib} --out {afile}/stats",
    "sweep {spec_yaml} --out {model}",
])
def test_real_processes_print_one_line_too(w, tmp_path, line: str) -> None:
    """The same, through the console entry point in a fresh process (no library chatter on stderr)."""
    argv = line.format(**w, out=tmp_path / "out").split()
    proc = subprocess.run([sys.executable, "-m", "moe_slim", *argv], capture_output=True, text=True,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("moe-slim: "), proc.stderr


def test_the_pickle_refusal_suggests_a_command_that_pastes_safely(w, tmp_path, capsys) -> None:
    """The conversion command in the message survives any path: quoted for the shell, a Python literal inside."""
    odd = tmp_path / "it's a \"model\" $HOME"
    shutil.copytree(w["pickled"], odd)
    assert main(["observe", str(odd), "--calib", f"general={w['calib']}", "--out", str(tmp_path / "s"),
                 "--no-layerwise"]) == 2
    err = capsys.readouterr().err.strip()
    command = shlex.split(err.split("convert it once: ", 1)[1])
    assert command[:2] == ["python", "-c"] and len(command) == 3
    tree = ast.parse(command[2])
    literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert sorted(literals) == [str(odd), f"{odd}-safetensors"]


def test_include_path_says_it_runs_code(capsys) -> None:
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "This RUNS PYTHON CODE from DIR" in text
