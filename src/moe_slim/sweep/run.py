"""Running a sweep: observe once, run every point in memory, commit each row as it finishes.

A sweep is the grid ``mixes x methods x ratios x budgets`` plus the unpruned baseline (method
``none``, ratio 0). Work is shared wherever the statistics allow:

* the calibration text is observed **once per domain** (with token samples when a merge method is
  in the grid); every mix is ``stats.mix(w)`` of those sums and every merge draws its sample from
  the same per-domain reservoirs. The statistics are cached under ``OUT/stats/<key>/`` so a re-run
  does not observe again;
* every point is evaluated in memory: ``copy.deepcopy`` of the loaded model, apply the plan (or
  merge), evaluate, throw away. No checkpoint is written unless ``write_best`` asks for one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import MoeSlimError
from ..evals.data import file_sha256
from ..outputs import check_resumable_dir, open_resumable_dir, pause_point
from .best import write_best
from .grid import Point, _canonical, _hash, point_key
from .spec import SWEEP_FORMAT, SweepSpec, parse_spec
from .store import DB_NAME, done_keys, headline, hypotheses, insert_row, open_db

Evaluator = Callable[[Any, Any, dict[str, Any]], dict[str, Any]]


# -- hashing inputs -----------------------------------------------------------------------------


def model_content_hash(model_dir: str | os.PathLike) -> str:
    """sha256 over the checkpoint's config and weight files (names and contents)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(root.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in ("config.json", "tokenizer.json")):
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


def load_spec_model(spec: SweepSpec) -> tuple[Any, Any]:
    """The sweep's model on the spec's device, in its compute dtype."""
    from ..modeling.devices import compute_dtype, resolve_device
    from ..modeling.loading import load_model

    device = resolve_device(spec.device)
    return load_model(spec.model, dtype=compute_dtype(spec.dtype, device, spec.model), device=device)


def read_calibration(spec: SweepSpec) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The first ``texts_per_domain`` texts of each calibration domain, and each file's sha256."""
    texts: dict[str, list[str]] = {}
    hashes: dict[str, str] = {}
    c = spec.calibration
    for d in c["domains"]:
        p = Path(spec.data_dir) / d / f"{c['split']}.jsonl"
        out: list[str] = []
        with p.open(encoding="utf-8") as fh:
            for line in fh:
                if len(out) >= c["texts_per_domain"]:
                    break
                if line.strip():
                    out.append(str(json.loads(line)["text"]))
        if not out:
            raise MoeSlimError(f"calibration domain '{d}' has no text in {p}")
        texts[d] = out
        hashes[str(p)] = file_sha256(p)[:16]
    return texts, hashes


def default_evaluator(model: Any, tok: Any, ev: dict[str, Any]) -> dict[str, Any]:
    from ..evals.run import evaluate

    return evaluate(model, tok, ev["suite"], data_dir=ev["data_dir"], tasks=ev.get("tasks"), limit=ev.get("limit"),
                    batch_size=ev.get("batch_size"), baseline=ev.get("baseline"), hash_weights=False,
                    split=ev.get("split", "test"))


def translation_hypotheses(result: dict[str, Any]) -> dict[str, str] | None:
    """A point's translations by sentence id, from evaluate's result (None when it did not translate)."""
    hyps = ((result.get("tasks") or {}).get("translation") or {}).get("hypotheses")
    return {str(h["id"]): str(h["hyp"]) for h in hyps} if hyps else None


# -- running points -----------------------------------------------------------------------------


class PointRunner:
    """Holds the loaded model, its statistics and the evaluator; runs one point at a time in memory."""

    def __init__(self, spec: SweepSpec, stats_dir: str | os.PathLike, shared: dict[str, Any],
                 calib_hashes: dict[str, str], evaluator: Evaluator | None = None, model: Any = None,
                 tok: Any = None, stats: Any = None) -> None:
        from ..experts.prune import count_parameters
        from ..experts.stats import RouterStats
        from ..fingerprint import library_versions

        if model is None:
            model, tok = load_spec_model(spec)
        self.model, self.tok = model, tok
        self.stats = stats if stats is not None else RouterStats.load(stats_dir)
        self.stats.check_model(self.model)
        self.spec, self.shared, self.calib_hashes = spec, shared, calib_hashes
        self.evaluator = evaluator or default_evaluator
        self.params_baseline = count_parameters(self.model)
        self.versions = library_versions()
        self.quiet_eval = False
        # the baseline point's translations: every other point's chrF is compared with them (paired bootstrap)
        self.baseline_hyps: dict[str, str] | None = None

    def _evaluate(self, m: Any, ev: dict[str, Any]) -> dict[str, Any]:
        if self.quiet_eval:  # library progress bars (lm-eval, generation) would bury the sweep's own bar
            import contextlib

            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
                return self.evaluator(m, self.tok, ev)
        return self.evaluator(m, self.tok, ev)

    def run(self, point: Point, key: str) -> dict[str, Any]:
        from ..api import plan_for
        from ..experts.merge.driver import merge_model
        from .targets import merge_choices
        from ..experts.prune import apply_plan, count_parameters
        from ..fingerprint import model_fingerprint

        spec = self.spec
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        E, L = self.stats.n_experts, self.stats.n_layers
        kept = [E] * L
        if point.kind == "baseline":
            m = self.model
        else:
            m = copy.deepcopy(self.model)
            if point.kind == "prune":
                plan = plan_for(m, self.stats, criterion=point.method, ratio=point.ratio, mix=point.mix,
                                budget=point.budget, floor=spec.floor, seed=spec.seed)
                timings["plan_s"] = time.perf_counter() - t0
                if point.method == "mone":  # MoNE: the others become novices (their mean output), not removed
                    from ..experts.mone import install_novices, novice_plan

                    install_novices(m, novice_plan(plan, self.stats, point.mix))
                else:
                    apply_plan(m, plan)
            else:
                plan = merge_model(m, self.stats, point.method, point.ratio, mix=point.mix,
                                   **{"seed": spec.seed, **merge_choices(spec.merge)})
            kept = plan.kept_counts
        timings["apply_s"] = time.perf_counter() - t0
        ev = dict(spec.eval, data_dir=spec.data_dir)
        if point.kind != "baseline" and self.baseline_hyps:
            ev["baseline"] = self.baseline_hyps
        recovered: dict[str, float] = {}
        before: dict[str, Any] = {}
        if spec.recover and point.kind != "baseline":
            from ..recover.stage import recover

            t1 = time.perf_counter()
            res_before = self._evaluate(m, ev)  # the point as pruned/merged, before healing
            before = dict(res_before["metrics"]) if "metrics" in res_before else dict(res_before)
            timings["eval_before_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            recovered = recover(m, self.tok, spec.recover, data_dir=spec.data_dir, source=self.model)
            m.eval()
            timings["recover_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        result = self._evaluate(m, ev)
        metrics = dict(result["metrics"]) if "metrics" in result else dict(result)
        metrics.update({k: float(v) for k, v in recovered.items() if isinstance(v, (int, float))})
        metrics.update({f"before_sft/{k}": v for k, v in before.items() if isinstance(v, (int, float))})
        hyps = translation_hypotheses(result)
        if point.kind == "baseline" and hyps:
            self.baseline_hyps = hyps
        timings["eval_s"] = time.perf_counter() - t1
        timings["total_s"] = time.perf_counter() - t0
        data_hashes = dict(self.calib_hashes)
        for path, h in (result.get("data", {}).get("files", {}) if "metrics" in result else {}).items():
            data_hashes[str(path)] = h if isinstance(h, str) else _canonical(h)
        row = {
            "key": key, "sweep": spec.name, "kind": point.kind, "method": point.method, "mix": point.mix_label,
            "ratio": point.ratio, "budget": point.budget, "config": {**point.config(), **self.shared},
            "metrics": metrics, **headline(metrics), "params": count_parameters(m),
            "params_baseline": self.params_baseline, "experts_kept": int(sum(kept)), "experts_total": E * L,
            "kept_per_layer": list(kept), "timings": {k: round(v, 3) for k, v in timings.items()},
            "model_fingerprint": model_fingerprint(self.model), "model_hash": self.shared["model_hash"],
            "stats_fingerprint": self.shared.get("stats_key"), "data_hashes": data_hashes, "versions": self.versions,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "hypotheses": hyps,
        }
        return row


_WORKER: PointRunner | None = None


def _worker_init(spec_raw: dict[str, Any], stats_dir: str, shared: dict[str, Any], calib_hashes: dict[str, str],
                 evaluator: Evaluator | None, threads: int, baseline_hyps: dict[str, str] | None = None) -> None:
    global _WORKER
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    spec = parse_spec(spec_raw, check_files=False)
    _WORKER = PointRunner(spec, stats_dir, shared, calib_hashes, evaluator)
    _WORKER.quiet_eval = True
    _WORKER.baseline_hyps = baseline_hyps


def _worker_run(point: Point, key: str) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER.run(point, key)


# -- the sweep ----------------------------------------------------------------------------------


def prepare_stats(spec: SweepSpec, out: Path, model: Any, tok: Any, model_hash: str,
                  log: Callable[[str], None]) -> tuple[Any, Path, str, dict[str, str]]:
    """Observe every calibration domain once (with merge samples if needed), cached under OUT/stats/<key>/."""
    from ..experts.observe import observe
    from ..experts.stats import RouterStats

    texts, hashes = read_calibration(spec)
    samples = spec.calibration["samples"] if spec.has_merge else 0
    key = _hash({"model_hash": model_hash, "calibration": spec.calibration, "samples": samples, "data": hashes})
    stats_dir = out / "stats" / key
    if (stats_dir / "meta.json").exists():
        stats = RouterStats.load(stats_dir)
        stats.check_model(model)
        log(f"statistics: cached in {stats_dir}")
        return stats, stats_dir, key, hashes
    c = spec.calibration
    t = time.perf_counter()
    stats = observe(model, tok, texts, seq_len=c["seq_len"], batch_size=c["batch_size"], max_tokens=c["max_tokens"],
                    samples=samples)
    stats.meta["model_path"] = spec.model
    stats.meta["calibration"] = {"sweep": spec.name, **c, "files": hashes}
    stats.save(stats_dir)
    log(f"statistics: observed {len(texts)} domains once in {time.perf_counter() - t:.0f}s -> {stats_dir}")
    return stats, stats_dir, key, hashes


def run_sweep(
    spec: SweepSpec,
    out: str | os.PathLike,
    *,
    jobs: int = 1,
    evaluator: Evaluator | None = None,
    max_points: int | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run every point of ``spec`` not yet in ``OUT/results.db``; return a summary.

    ``max_points`` stops after that many new points (the rest run on the next call); ``on_point``
    is called with each row after it is committed. ``evaluator(model, tok, eval_cfg)`` replaces
    :func:`moe_slim.evals.run.evaluate` (it returns evaluate's dict or a flat metrics dict; with
    ``jobs > 1`` it must be a module-level function).
    """
    from tqdm import tqdm


    say = log or (lambda msg: None)
    if jobs < 1:
        raise MoeSlimError(f"--jobs must be at least 1 (got {jobs})")
    out = Path(out)
    check_resumable_dir(out, "sweep", [spec.model, spec.data_dir, spec.path])
    model_hash = model_content_hash(spec.model)
    model, tok = load_spec_model(spec)
    open_resumable_dir(out, "sweep", [spec.model, spec.data_dir, spec.path])
    stats, stats_dir, stats_key, calib_hashes = prepare_stats(spec, out, model, tok, model_hash, say)
    shared = spec.shared_config(model_hash)
    shared_row = dict(shared, stats_key=stats_key)
    conn = open_db(out / DB_NAME)
    points = [(p, point_key(p, shared)) for p in spec.points()]
    with conn:
        # point_keys: the points of this spec on this model; reports read only these, so rows left in the
        # database by an earlier spec or another model (e.g. a retrained checkpoint) never mix into them
        for k, v in {"spec": spec.raw, "model": spec.model, "data_dir": spec.data_dir, "stats_dir": str(stats_dir),
                     "name": spec.name, "format": SWEEP_FORMAT, "point_keys": sorted(k for _, k in points)}.items():
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, _canonical(v)))
    done = done_keys(conn)
    todo = [(p, k) for p, k in points if k not in done]
    already = len(points) - len(todo)
    if max_points is not None:
        todo = todo[:max_points]
    say(f"sweep '{spec.name}': {len(points)} points ({already} already done, {len(todo)} to run, jobs={jobs}) "
        f"-> {out / DB_NAME}")
    ran = 0
    started = time.perf_counter()
    bar = tqdm(total=len(points), initial=already, desc="sweep", unit="pt", disable=not progress, dynamic_ncols=True)

    def commit(row: dict[str, Any]) -> None:
        nonlocal ran
        insert_row(conn, row)
        ran += 1
        pause_point("after-first-point")
        bar.update(1)
        bar.set_postfix_str(f"{row['method']} {row['ratio']:g} {row['mix']}"[:40])
        if on_point is not None:
            on_point(row)

    try:
        runner = PointRunner(spec, stats_dir, shared_row, calib_hashes, evaluator, model=model, tok=tok, stats=stats)
        runner.quiet_eval = progress
        if todo and todo[0][0].kind == "baseline":  # every other point is compared with it: run it first, here
            commit(runner.run(*todo[0]))
            todo = todo[1:]
        baseline_key = next(k for p, k in points if p.kind == "baseline")
        runner.baseline_hyps = hypotheses(conn, baseline_key)
        if jobs == 1 or len(todo) <= 1:
            for p, k in todo:
                commit(runner.run(p, k))
        else:
            baseline_hyps = runner.baseline_hyps
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            del model, stats, runner
            threads = max(1, (os.cpu_count() or 1) // jobs)
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx, initializer=_worker_init,
                                     initargs=(spec.raw, str(stats_dir), shared_row, calib_hashes, evaluator,
                                               threads, baseline_hyps)) as pool:
                pending = {pool.submit(_worker_run, p, k) for p, k in todo}
                try:
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            commit(f.result())
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
    finally:
        bar.close()
        conn.close()
    summary = {"out": str(out), "db": str(out / DB_NAME), "points": len(points), "already_done": already,
               "ran": ran, "remaining": len(points) - already - ran, "stats_dir": str(stats_dir),
               "seconds": round(time.perf_counter() - started, 1)}
    if spec.write_best and summary["remaining"] == 0:
        summary["best"] = write_best(out, spec.write_best, log=say)
    return summary
