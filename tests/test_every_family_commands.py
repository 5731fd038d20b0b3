"""Every MoE family through every command: the families :mod:`test_every_family` enumerates from transformers
(minus those the table refuses or leaves untested), each a tiny model saved once, then

* observe: layer-wise gives whole-model observation's statistics, and two data-parallel processes (gloo, CPU,
  one launch for all families) sum to one process's;
* merge: at size (streamed from the shards) writes the in-memory merge's plan and tensors exactly (REAM);
* sft: one step changes what the mode trains and nothing else (``experts`` on the merged checkpoint,
  ``router`` in memory), and eval runs on its output (perplexity; translation for encoder-decoders);
* mone: both outputs written (the substitution checkpoint valid, the standard one loading), or refused in
  one line where the family's experts take router-scaled inputs;
* sweep: a two-point sweep (baseline and MoNE, or frequency pruning where MoNE is refused) runs and scores.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dp_observe_families import SETTINGS, TEXTS
from eval_fixtures import write_fixture_data

sys.path.insert(0, str(Path(__file__).parent / "experts"))
from test_layerwise import assert_same_stats  # noqa: E402

from moe_slim.api import merge_checkpoint, mone_checkpoint, sft, sft_checkpoint  # noqa: E402
from moe_slim.checkpoint.substitution import check_substitution  # noqa: E402
from moe_slim.errors import MoeSlimError  # noqa: E402
from moe_slim.evals.run import evaluate  # noqa: E402
from moe_slim.experts.observe import observe, observe_layerwise  # noqa: E402
from moe_slim.experts.stats import RouterStats  # noqa: E402
from moe_slim.families import REFUSED, family_of, moe_layers  # noqa: E402
from moe_slim.families.catalog import moe_model_types  # noqa: E402
from moe_slim.families.table import UNTESTED  # noqa: E402
from moe_slim.modeling.loading import load_config, load_model  # noqa: E402
from moe_slim.modeling.shards import ShardedCheckpoint  # noqa: E402
from moe_slim.modeling.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from moe_slim.sweep.run import run_sweep  # noqa: E402
from moe_slim.sweep.spec import parse_spec  # noqa: E402
from moe_slim.sweep.store import read_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAUNCHES: dict[Path, subprocess.Popen] = {}
FAMILIES = [t for t in moe_model_types() if t not in REFUSED and t not in UNTESTED]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_thread():
    """Module-scoped fixtures observe too: on one thread, as the data-parallel processes do (another thread
    count adds the float32 partial sums in another order), and far faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory, one_thread) -> Path:
    """Every family's tiny checkpoint (``ROOT/TYPE/src``, float32, 30 KB shards) and the fixture data; the
    data-parallel launch over all of them starts here and runs beside the tests (see :func:`data_parallel`)."""
    root = tmp_path_factory.mktemp("families")
    write_fixture_data(root / "data", n_per_domain=3, splits=("test", "train", "calibration"))
    for mt in FAMILIES:
        tiny_model(mt, seed=1).save_pretrained(str(root / mt / "src"), max_shard_size="30KB")
        tiny_tokenizer().save_pretrained(str(root / mt / "src"))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    with open(root / "dp.log", "w") as log:
        launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                   "--master-addr", "127.0.0.1", "--master-port", str(_port()),
                                   str(Path(__file__).parent / "dp_observe_families.py"), str(root), *FAMILIES],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    LAUNCHES[root] = launch
    yield root
    if launch.poll() is None:  # a run stopped early (-x): end our own launch, workers with it
        os.killpg(launch.pid, signal.SIGKILL)
        launch.wait()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, root: Path) -> dict:
    """One family's checkpoint, loaded model and whole-model statistics (with merge samples, saved)."""
    mt = request.param
    model, tok = load_model(root / mt / "src")
    stats = observe(model, tok, TEXTS, **SETTINGS)
    stats.save(root / mt / "whole")
    return dict(type=mt, dir=root / mt, src=root / mt / "src", model=model, tok=tok, stats=stats, data=root / "data")


def _eval_task(model: torch.nn.Module) -> tuple[str, str]:
    """The cheapest evaluation that measures something: perplexity, or (encoder-decoder models, which
    perplexity skips) translating one sentence per language pair of the fixture's test split."""
    if model.config.is_encoder_decoder:
        return "translation", "translation/chrf"
    return "perplexity", "perplexity/ppl"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = ShardedCheckpoint(path)
    return {k: ckpt.tensor(k) for k in ckpt.keys}


def _only_changed(before: torch.nn.Module, after: torch.nn.Module, prefixes: list[str]) -> None:
    """Training changed parameters under ``prefixes`` only, and something under each of them."""
    old = dict(before.named_parameters())
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, old[n])}
    assert all(n.startswith(tuple(prefixes)) for n in changed), sorted(changed)
    assert all(any(n.startswith(p) for n in changed) for p in prefixes), ("untrained", sorted(changed))


# ------------------------------------------------------------------------------------------ observe


def test_layerwise_observation_equals_whole_model(family: dict) -> None:
    layerwise = observe_layerwise(family["src"], family["tok"], TEXTS, **SETTINGS)
    layerwise.save(family["dir"] / "layerwise")  # the data-parallel test's reference
    assert_same_stats(family["stats"], layerwise)


@pytest.fixture(scope="module")
def data_parallel(root: Path) -> Path:
    """ONE two-process launch observes every family (whole model and layer-wise): processes started and
    torch imported once, not once per family. Started with the checkpoints, awaited here."""
    launch = LAUNCHES[root]
    assert launch.wait(timeout=600) == 0, (root / "dp.log").read_text()[-3000:]
    return root


def _same_sums(one: RouterStats, two: RouterStats) -> None:
    """Counts and maxima equal; float64 sums equal up to the order of addition; samples equal."""
    assert two.meta["processes"] == 2 and one.domains.keys() == two.domains.keys()
    for d in one.domains:
        assert one.domains[d].keys() == two.domains[d].keys()
        for f, t in one.domains[d].items():
            if not t.is_floating_point() or f in ("tokens", "count", "coselect", "norm_max"):
                assert torch.equal(t, two.domains[d][f]), (d, f)
            else:
                torch.testing.assert_close(t, two.domains[d][f], rtol=1e-12, atol=1e-9, msg=f"{d} {f}")
    sa, sb = one.samples.tensors(), two.samples.tensors()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------- merge, sft, eval


def test_merge_at_size_equals_in_memory_then_sft_and_eval(family: dict, tmp_path: Path) -> None:
    kw = dict(method="ream", ratio=0.5, stats_path=family["dir"] / "whole", device="cpu", align_tokens=32)
    merge_checkpoint(family["src"], tmp_path / "at_size", **kw)
    merge_checkpoint(family["src"], tmp_path / "memory", in_memory=True, **kw)
    plans = [json.loads((tmp_path / p / "plan.json").read_text()) for p in ("at_size", "memory")]
    assert plans[0]["info"]["at_size"] is True
    assert [l["groups"] for l in plans[0]["layers"]] == [l["groups"] for l in plans[1]["layers"]]
    a, b = _tensors(tmp_path / "at_size"), _tensors(tmp_path / "memory")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # sft --mode experts on the merged checkpoint: only the MoE blocks change, every one of them does
    sft_checkpoint(tmp_path / "at_size", tmp_path / "sft", data="translation=1", data_dir=family["data"], steps=1,
                   mode="experts", lr=1e-2, batch_size=2, seq_len=64, device="cpu", progress=False)
    merged, (model, tok) = load_model(tmp_path / "at_size")[0], load_model(tmp_path / "sft")
    _only_changed(merged, model, [f"{layer.name}." for layer in moe_layers(merged)])
    # eval on the output
    assert all(layer.num_experts == plans[0]["num_experts"] // 2 for layer in moe_layers(model))
    task, metric = _eval_task(model)
    res = evaluate(model, tok, tasks=[task], limit=1, data_dir=family["data"], seq_len=32)
    assert 0.0 <= res["metrics"][metric] < float("inf"), res["metrics"]


def test_sft_router_mode_changes_only_the_routers(family: dict) -> None:
    before, model = family["model"], copy.deepcopy(family["model"])
    routers = [f"{layer.name}.{layer.family.router_attr}." for layer in moe_layers(model)]
    records = [{"prompt": "the cat ", "target": "sat on the mat"}, {"prompt": "a dog ", "target": "ran to the sea"}]
    sft(model, family["tok"], records, steps=1, mode="router", lr=1e-2, batch_size=2, seq_len=32, progress=False,
        cpu=True)
    _only_changed(before, model, routers)


# -------------------------------------------------------------------------------------------- mone


def test_mone_writes_both_checkpoints_or_refuses_in_one_line(family: dict, tmp_path: Path) -> None:
    fam = family_of(load_config(family["src"]))
    args = (family["src"], family["dir"] / "whole")
    if fam.routing is not None:  # the table: experts take router-scaled inputs (Llama-4)
        with pytest.raises(MoeSlimError) as err:
            mone_checkpoint(*args, tmp_path / "mone", ratio=0.5)
        assert "MoNE is not supported" in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "mone").exists()
        return
    nplan = mone_checkpoint(*args, tmp_path / "mone", ratio=0.5)
    config = json.loads((tmp_path / "mone" / "config.json").read_text())
    check_substitution(config["compression_config"]["transform_config"]["expert_substitution"])
    assert (tmp_path / "mone" / "novices.safetensors").is_file()
    mone_checkpoint(*args, tmp_path / "standard", ratio=0.5, standard=True)
    model, _ = load_model(tmp_path / "standard")
    assert [layer.num_experts for layer in moe_layers(model)] == [len(lp.keep) for lp in nplan.plan.layers]


# ------------------------------------------------------------------------------------------- sweep


def test_a_sweep_point_runs(family: dict, tmp_path: Path) -> None:
    method = "frequency" if family_of(family["model"]).routing is not None else "mone"
    task, metric = _eval_task(family["model"])
    spec = parse_spec({
        "name": "t", "model": str(family["src"]), "data_dir": str(family["data"]), "device": "cpu",
        "calibration": {"domains": ["general", "code"], "split": "calibration", "texts_per_domain": 2, "seq_len": 16,
                        "batch_size": 2, "max_tokens": 64},
        "mixes": [{"general": 1}], "methods": [method], "ratios": [0.5], "budgets": ["uniform"],
        "eval": {"tasks": [task], "limit": 1},
    })
    summary = run_sweep(spec, tmp_path / "sweep", progress=False, log=None)
    assert summary["ran"] == 2 and summary["remaining"] == 0
    rows = {r["kind"]: r for r in read_rows(tmp_path / "sweep" / "results.db")[0]}
    assert rows["prune"]["method"] == method
    assert rows["prune"]["experts_kept"] == rows["baseline"]["experts_kept"] // 2
    assert all(0.0 <= r["metrics"][metric] < float("inf") for r in rows.values()), rows


# ---------------------------------------------------------------------- data-parallel observation


@pytest.mark.parametrize("model_type", FAMILIES)
def test_data_parallel_observation_sums_to_one_process(model_type: str, data_parallel: Path) -> None:
    """Last in the file (not grouped with the family's other tests): the launch has run beside them."""
    d = data_parallel / model_type
    assert not (d / "dp_error.txt").exists(), (d / "dp_error.txt").read_text()
    if not (d / "whole").is_dir() or not (d / "layerwise").is_dir():  # this test run alone: observe here
        model, tok = load_model(d / "src")
        observe(model, tok, TEXTS, **SETTINGS).save(d / "whole", overwrite=True)
        observe_layerwise(d / "src", tok, TEXTS, **SETTINGS).save(d / "layerwise", overwrite=True)
    for one, two in (("whole", "dp_whole"), ("layerwise", "dp_layerwise")):
        _same_sums(RouterStats.load(d / one), RouterStats.load(d / two))


def test_pruning_keeps_what_else_an_experts_module_dict_holds() -> None:
    """NLLB-MoE's experts are a ModuleDict that also holds its token dropout: pruning and MoNE's substitution
    writer remove experts by name (MoNE once read every key as ``expert_<i>`` and crashed on it)."""
    from moe_slim.experts.plan import ExpertPlan, LayerPlan
    from moe_slim.experts.prune import apply_plan

    model = tiny_model("nllb-moe")
    layers = moe_layers(model)
    fam = family_of(model)
    plan = ExpertPlan(fam.name, 8, fam.top_k(model.config), [LayerPlan(l.name, [1, 3, 4, 6]) for l in layers])
    experts = {l.name: [l.expert_module(e) for e in (1, 3, 4, 6)] for l in layers}
    apply_plan(model, plan)
    for layer in moe_layers(model):
        assert isinstance(layer.experts.token_dropout, torch.nn.Dropout)
        assert [layer.expert_module(j) for j in range(4)] == experts[layer.name]
        assert sorted(layer.experts.keys()) == sorted(["token_dropout", *(f"expert_{j}" for j in range(4))])
