"""What each `optc` subcommand does; cli.py parses, this file works.

Each `cmd_*` returns the JSON document `--json` prints (or None) and prints its
human-readable report to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from optc.errors import UsageError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Parsed arguments -> settings. They live with the handlers that use them, not in
# cli.py: cli.py imports this module, and importing it back would be a cycle.
def pass_settings(args) -> dict:
    """--config then --set (which wins), as {"pass": {"key": value}}, checked against
    --pipeline here: an unknown pass, key or value is exit 2 before any model loads."""
    from optc.compiler.config import flat_to_nested, parse_sets
    from optc.compiler.pipeline import resolve as resolve_pipeline

    settings: dict = {}
    if args.config:
        path = Path(args.config)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"--config {path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config {path}: not valid JSON ({exc})") from None
        data = data.get("passes", data) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            raise UsageError(f"--config {path}: expected a JSON object of pass settings")
        nested = data if all(isinstance(v, dict) for v in data.values()) else flat_to_nested(data)
        for name, values in nested.items():
            settings.setdefault(name, {}).update(values)
    for name, values in parse_sets(args.set).items():
        settings.setdefault(name, {}).update(values)
    resolve_pipeline(args.pipeline, settings)
    return settings


def dynamic_dims(args) -> tuple[str, ...]:
    return tuple(d.strip() for d in args.dynamic.split(",") if d.strip())


def _load_model(spec: str, target):
    from optc.compiler import targets
    from optc.models.user import resolve

    _log(f"[optc] loading {spec} ...")
    dtype = None if target.device == "cpu" else target.dtype
    device = target.device
    if not targets.available(target):  # compiled here, lowered and checked where it loads
        _log(f"[optc] no {target.name} device here: capturing on the CPU in {str(dtype).removeprefix('torch.')}; "
             f"the artifact is lowered and checked when it is loaded on the {target.name}")
        device = "cpu"
    return resolve(spec, device=device, dtype=dtype)


def compile_model(args, *, evaluate: bool, verify: bool | None = None):
    import optc
    from optc.compiler import targets
    from optc.compiler.capture import PREFILL_LEN

    target = targets.get(args.target)
    settings = pass_settings(args)
    if getattr(args, "tuning_from", None):  # refused before minutes of capture
        from optc.runtime.tuning import carry_tuning

        carry_tuning(args.tuning_from, target, log=lambda msg: _log(f"[optc] {msg}"))
    entry, module, example_inputs = _load_model(args.model, target)
    art = optc.compile(
        module,
        example_inputs,
        target=target.name,
        pipeline_name=args.pipeline,
        passes=settings,
        entry=entry,
        calibration=optc.read_calibration(args.calibration, module, example_inputs, entry=entry),
        max_cache_len=args.max_cache_len,
        dynamic=dynamic_dims(args),
        prefill_len=getattr(args, "prefill_len", None) or PREFILL_LEN,
        verify=(not getattr(args, "no_verify", False)) if verify is None else verify,
        evaluate=evaluate,
        package=getattr(args, "package", "none"),
    )
    return entry, art


def cmd_compile(args):
    start = time.perf_counter()
    entry, art = compile_model(args, evaluate=args.eval)
    man = art.manifest
    name = (entry.name if entry else Path(args.model.split(":")[0]).stem).replace("/", "_")
    out = Path(args.output or f"{name}-{man['config']['hash']}.optc")
    art.save(out)
    result = {
        "artifact": str(out),
        "target": man["target"],
        "config": man["config"],
        "config_hash": man["config"]["hash"],
        "passes": [
            {k: p.get(k) for k in ("name", "applied", "reason", "seconds", "lossy", "plan", "programs")}
            for p in man["passes"]
        ],
        "params": man["params"],
        "estimate": man.get("estimate"),
        "verification": man["verification"],
        "lowering": man.get("lowering"),
        "kernel_cache": man.get("kernel_cache"),
        "packages": man.get("packages"),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if man.get("quality"):
        result["quality"] = man["quality"]
    _report_compile(result)
    return result


def _report_compile(r: dict) -> None:
    _log(f"\noptc compile: {r['artifact']} (target {r['target']}, config {r['config_hash']}, {r['seconds']} s)")
    for p in r["passes"]:
        state = "applied" if p["applied"] else f"not applied: {p['reason']}"
        _log(f"  pass {p['name']:<22} {state}")
        if p["applied"] and p["name"] == "skip_layers":
            _log(f"       removed: {', '.join(f'{i}.{part}' for i, part in p['plan']['units'])} — {p['plan'].get('why', '')}")
    pb, pa = r["params"]["before"], r["params"]["after"]
    _log(f"  params: {pb:,} -> {pa:,} ({100 * (pb - pa) / max(pb, 1):.1f}% fewer)")
    e = r.get("estimate")
    if e and "unavailable" in e:
        _log(f"  estimate ({e['source']}): unavailable: {e['unavailable']}")
    elif e:
        from optc.compiler.lossy_estimate import verdict

        _log(f"  estimate ({e['source']}, {e['program']}): {e['compressed_ms']:.3f} ms against {e['dense_ms']:.3f} "
             f"dense, {verdict(e)}")
    for name, v in r["verification"].items():
        if isinstance(v, dict):
            how = ""
            if "regimes" in v:  # a thresholded program: judged with every threshold kept / dropped
                how = (f", with every threshold kept / dropped; at the calibrated thresholds "
                       f"{v['at_calibrated_thresholds_rel_err']:.2e}, not judged: rounding can flip decisions there")
            if v.get("tolerance", 0) > v.get("tolerance_floor", float("inf")):
                how = f": the program's own bf16/fp16 rounding noise{how}"
            _log(f"  lowering of {name}: rel. error {v['max_rel_err']:.2e} (tolerance {v['tolerance']:.3g}{how}) ok")
        else:
            _log(f"  lowering: {v}")
    _report_lowering(r.get("lowering"))
    _report_kernel_cache(r.get("kernel_cache"))
    _report_packages(r.get("packages"))
    q = r.get("quality")
    if q:
        spread = (f"; loss {q['loss']:.4f}, {q['halves'][0]:.4f} / {q['halves'][1]:.4f} on the two halves"
                  if "halves" in q else "")
        _log(f"  quality ({q['metric']}, held-out {q['split']} split, n={q['n']}): {q['before']:.4g} -> "
             f"{q['after']:.4g}{spread}")
        _report_decode_quality(q.get("decode"))
        sparsity = q.get("sparsify_activations") or {}
        if sparsity.get("sparsity") is not None:
            rows = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in sparsity.get("rows_read", {}).items())
            _log(f"  held-out activation sparsity {sparsity['weighted_sparsity']:.3f}; "
                 f"weight rows read for tokens at once: {rows}")


def _report_lowering(rec: dict | None) -> None:
    if not rec or not rec.get("check"):
        return
    differ = sorted(name for name, load in rec["load"].items() if load != rec["check"].get(name))
    if differ:  # the check lowers as a load does: this says the manifest was written otherwise
        _log(f"  note: a load on {rec['target']} lowers {', '.join(differ)} otherwise than the check did (manifest "
             "'lowering'), so its kernels were not the ones checked")


def _report_kernel_cache(rec: dict | None) -> None:
    """What the artifact's kernel cache holds, or why it has none (also `optc inspect`)."""
    if not rec:
        return
    if "skipped" in rec:
        _log(f"  kernel cache: none ({rec['skipped']})")
        return
    env, n, triton = rec.get("environment", {}), rec.get("entries", {}), rec.get("triton_kernels") or {}
    _log(f"  kernel cache: {rec['bytes'] / 1e6:.1f} MB, {n.get('inductor', 0)} compiled graphs and "
         f"{n.get('autotune', 0)} tuned kernel configs"
         + (f", {triton['kernels']} Triton kernels the check compiled ({triton['bytes'] / 1e6:.1f} MB)" if triton else "")
         + f" for {env.get('target')} (torch {env.get('torch')}"
         + (f", triton {env['triton']}" if env.get("triton") else "") + (f", {env['gpu']}" if env.get("gpu") else "")
         + "); a load in that environment lowers from them: no code generation, no tuning")


def _report_packages(rec: dict | None) -> None:
    """One line per program: packaged (size, seconds) or why not (also `optc inspect`)."""
    if not rec or rec.get("format") != "aoti":
        _log("  packages: none (the portable programs are lowered by Inductor at load)")
        return
    env = rec.get("environment", {})
    _log(f"  AOTInductor packages for {env.get('target')} (torch {env.get('torch')}"
         + (f", triton {env['triton']}" if env.get("triton") else "")
         + (f", {env['cpu_isa']}" if env.get("cpu_isa") else "") + (f", {env['gpu']}" if env.get("gpu") else "") + "):")
    for name, p in rec.get("programs", {}).items():
        if "skipped" in p:
            _log(f"    {name}: not packaged: {p['skipped']}")
        else:
            checked = p.get("verification")
            how = f", rel. error {checked['max_rel_err']:.2e}" if checked else ", not verified"
            _log(f"    {name}: {p['size'] / 1e6:.1f} MB, {p['seconds']} s{how}; sha256 {p['sha256'][:12]}")


def _report_decode_quality(d: dict | None) -> None:
    if not d:
        return
    if "skipped" in d:
        _log(f"  quality through the decode program: not measured ({d['skipped']})")
        return
    from optc.runtime.decode_quality import ran_as

    _log(f"  quality through the decode program ({ran_as(d)}, {d['device']}; {d['windows']} held-out windows of "
         f"{d['window_tokens']} tokens, {d['prefill_tokens']} prefilled then decoded one at a time, "
         f"n={d['tokens']}): {d['metric']} {d['before']:.4g} -> {d['after']:.4g}; the prefill graph on the "
         f"same tokens {d['prefill_graph_after']:.4g} ({100 * d['vs_prefill_graph']:+.2f}%)")


def cmd_inspect(args):
    from optc.runtime.artifact import read_artifact, verify_versions
    from optc.errors import ArtifactError

    from optc.compiler.codegen import kernel_cache
    from optc.runtime.packages import check_hashes
    from optc.runtime.shared_weights import stored_once

    loaded = read_artifact(args.artifact, check_versions=False)  # checksums are always checked
    check_hashes(loaded.manifest, loaded.extra_files, loaded.manifest["files"])  # the digests read_artifact checked
    kernel_cache.check_hash(loaded.manifest, loaded.extra_files, loaded.manifest["files"])
    man = loaded.manifest
    try:
        verify_versions(man, args.artifact)
        compatible = True
    except ArtifactError as exc:
        compatible = False
        _log(f"warning: {exc}")
    anatomy = man.get("anatomy", {})
    _log(f"{args.artifact}: {man['model'].get('name')} ({man['model'].get('task')}) for {man['target']}")
    _log(f"  optc {man['optc_version']}, torch {man['torch_version']}, triton {man.get('triton_version')}, created {man['created']}")
    _log(f"  programs: {', '.join(sorted(loaded.programs))}; config {man['config_hash']}")
    entries, nbytes = stored_once(loaded.programs, man.get("shared_weights"))
    if entries:
        _log(f"  weights the programs share: {entries} entries stored once ({nbytes / 1e6:.1f} MB that a copy per "
             "program would add)")
    blob = man.get("weights_blob")
    if blob:
        count = sum(len(entries) for entries in blob["entries"].values())
        _log(f"  parameters: {count} entries in one member, {blob['member']} "
             f"({man['files'][blob['member']]['size'] / 1e6:.1f} MB, read and moved to the device at once)")
    _log(f"  anatomy: {anatomy.get('n_blocks', 0)} blocks" + (f" ({anatomy['reason']})" if anatomy.get("reason") else ""))
    for b in anatomy.get("blocks", [])[:64]:
        a, m = b["attention"], b["mlp"]
        _log(f"    [{b['index']:>2}] {b['path']}: attn {a['heads']}h/{a['kv_heads']}kv x{a['head_dim']}"
             f"{' +kv-cache' if a['kv_cache'] else ''}; mlp {'gated ' if m['gated'] else ''}{m['activation']} {m['hidden']}")
    for p in man.get("passes", []):
        _log(f"  pass {p['name']}: {'applied' if p['applied'] else 'not applied: ' + str(p['reason'])}")
    if man.get("quality"):
        q = man["quality"]
        _log(f"  quality {q['metric']}: {q['before']:.4g} -> {q['after']:.4g} ({q['split']} split)")
    _report_kernel_cache(man.get("kernel_cache"))
    _report_packages(man.get("packages"))
    return {"artifact": args.artifact, "compatible": compatible, "programs": sorted(loaded.programs), **man}


def cmd_bench(args):
    from optc.runtime.bench import bench

    return bench(
        args.model,
        target=args.target,
        baselines=[n.strip() for n in args.baselines.split(",") if n.strip()],
        tokens=args.tokens,
        batch=args.batch,
        seq=args.seq,
        variants=_bench_variants(args),  # bad settings are refused before anything is loaded
        autotune=not args.no_autotune,
        rounds=args.rounds,
        out=args.out,
        max_cache_len=args.max_cache_len,
        dynamic=dynamic_dims(args),
        calibration=args.calibration,
        artifacts=args.artifact,
        tuning_from=args.tuning_from,
    )


def _bench_variants(args) -> list[tuple[str, str, dict, tuple]]:
    """(label, pipeline, settings, lowering overrides) of each optc row: the pipeline with
    its defaults first (lossless passes only: the dense row), then --set/--config, then
    each --variant, whose `target.FIELD=VALUE` words change how that row is lowered."""
    import shlex

    from optc.compiler import targets
    from optc.compiler.config import parse_sets
    from optc.compiler.pipeline import resolve as resolve_pipeline

    rows = [(pass_settings(args), ())]
    for text in args.variant or []:
        try:
            items = shlex.split(text)  # quote a value with spaces: "skip_layers.layers='[1, 2]'"
        except ValueError as exc:
            raise UsageError(f"--variant {text!r}: {exc}") from None
        settings, lowering = targets.split_words(items)
        if not items:
            raise UsageError("--variant needs at least one PASS.KEY=VALUE or target.FIELD=VALUE setting")
        _check_lowering_words(args.target, lowering)
        rows.append((parse_sets(settings) if settings else {}, tuple(lowering)))
    variants = [("optc", args.pipeline, {}, ())]
    for sets, lowering in rows:
        if sets or lowering:
            resolve_pipeline(args.pipeline, sets)  # unknown pass, key or value: exit 2 now
            words = [f"{p}.{k}={json.dumps(v)}" for p, vals in sets.items() for k, v in vals.items()]
            label = "optc " + " ".join(words + [f"target.{w}" for w in lowering])
            if any(label == v[0] for v in variants):
                raise UsageError(f"two optc rows have the same settings: {label}")
            variants.append((label, args.pipeline, sets, lowering))
    return variants


def _check_lowering_words(target_name: str, lowering: list[str]) -> None:
    """An unknown field or value, or a word that only repeats the target's own setting (its
    row would be the dense row again, under another name): exit 2 before anything loads."""
    from optc.compiler import targets

    target = targets.get(target_name)
    for word in lowering:
        if targets.changes_nothing(target, [word]):
            raise UsageError(f"--variant target.{word}: that is already how {target.name} lowers programs, so the "
                             "word changes nothing; leave it out, or name a setting that differs")


def cmd_search(args):
    from optc.search import SearchRequest, search

    req = SearchRequest(
        model=args.model, target=args.target, trials=args.trials, max_quality_loss=args.max_quality_loss,
        storage=args.storage, study=args.study, workers=args.workers, pipeline=args.pipeline,
        fixed=pass_settings(args), out_dir=args.output, tokens=args.tokens, batch=args.batch,
        measure_all=args.measure_all, compile_best=not args.no_artifact, package=args.package,
        confirm_rounds=args.confirm_rounds,
        seed=args.seed, time_limit_s=args.time_limit, lowering=args.lowering, calibration=args.calibration,
        tuning_from=args.tuning_from,
    )
    return search(req, worker_only=args.worker)


def cmd_export(args):
    from optc.compiler.codegen.mlir import export_mlir
    from optc.compiler.codegen.mlir_state import state_names

    if args.model.endswith(".optc"):
        if args.set or args.config:
            raise UsageError(f"--set and --config compile a model; {args.model} is compiled already: export it "
                             "as it is, or export the model with the settings")
        from optc.runtime.artifact import read_artifact
        from optc.runtime.loaded import Artifact

        # Read and its members checked against the manifest; export emits the programs and
        # neither lowers them nor runs packages, so optc.load's work for those is left out.
        loaded = read_artifact(args.model)
        art = Artifact(loaded.programs, loaded.manifest, loaded.extra_files)
    else:
        # What is emitted is the rewritten program, not Inductor's lowering of it: checking
        # that lowering would take minutes and check nothing that lands in the file.
        _, art = compile_model(args, evaluate=False, verify=False)
    name = args.program or ("forward" if "forward" in art.programs else "prefill")
    if name not in art.programs:
        raise UsageError(f"--program {name}: the model has no such program; it has {', '.join(sorted(art.programs))}")
    ep = art.programs[name]
    state = state_names(ep)
    path = export_mlir(ep, None, args.format, args.output)
    _log(f"optc export: wrote the {name} program as {args.format} to {path}")
    if state:
        _log(f"  its state ({len(state)} tensors: {', '.join(state[:4])}{' ...' if len(state) > 4 else ''}) "
             "is taken after the program's inputs and returned, updated, before its outputs")
    return {"output": str(path), "format": args.format, "program": name, "state": state}


def cmd_models(args):
    from optc.models import zoo

    rows = [e.to_dict() for e in zoo.entries()]
    if not args.json:
        print(f"{'name':<14} {'family':<7} {'task':<21} {'weights':<8} {'metric':<17} description")
        for r in rows:
            print(f"{r['name']:<14} {r['family']:<7} {r['task']:<21} {'real' if r['real_weights'] else 'random':<8} "
                  f"{r['metric']:<17} {r['description']}")
        return None
    return {"models": rows}
