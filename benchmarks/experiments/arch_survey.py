"""Architecture survey: tiny random-weight Hugging Face models through optc.compile
(target cpu, verify on) with the default pipeline and with each pass alone, each case in
a process of its own (benchmarks/NOTES.md, "Models users bring").

Driver:  python benchmarks/experiments/arch_survey.py OUT_DIR [--jobs 2] [--timeout 240]
             [--only ARCH,...] [--cases c1,c2]
Worker:  ... --worker ARCH CASE   (one (arch, case) in this process; its result is the
         stdout line starting with MARK)
Results: each case's log in OUT_DIR/results/, the table in OUT_DIR/results.md, and every
case under the result envelope in OUT_DIR/arch_survey_cpu.json (../harness.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
PY = sys.executable
HERE = Path(".")  # OUT_DIR, set by main()
MARK = "ARCH_SURVEY_RESULT "
RESULTS = HERE / "results"

DECODERS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
            "GemmaForCausalLM", "Gemma2ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM",
            "StableLmForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "FalconForCausalLM"]
ENCODERS = ["BertModel", "RobertaModel", "DistilBertModel", "XLMRobertaModel", "ElectraModel",
            "ViTModel", "DeiTModel", "Dinov2Model"]
VISION = {"ViTModel", "DeiTModel", "Dinov2Model"}

CASES = {
    "default": {},
    "skip_layers": {"skip_layers.count": 1},
    "prune_mlp": {"prune_mlp.ratio": 0.25},
    "prune_heads": {"prune_heads.ratio": 0.5},
    "sparsify": {"sparsify_activations.sparsity": 0.5},
    "merge_tokens": {"merge_tokens.r": 2},
}
DEC_CASES = ["default", "skip_layers", "prune_mlp", "prune_heads", "sparsify"]
ENC_CASES = DEC_CASES + ["merge_tokens"]

H, L, NH, NKV, HD, V, FF = 64, 2, 4, 2, 16, 256, 128
MAX_CACHE_LEN = 64
N_CALIB = 8


# ----------------------------------------------------------------------------- models

def _config(arch: str):
    import transformers as T

    common = dict(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
                  num_attention_heads=NH, max_position_embeddings=128)
    gqa = dict(common, num_key_value_heads=NKV, bos_token_id=None, eos_token_id=None)
    if arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "StableLmForCausalLM",
                "GraniteForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM"):
        cls = {"LlamaForCausalLM": T.LlamaConfig, "Qwen2ForCausalLM": T.Qwen2Config, "Phi3ForCausalLM": T.Phi3Config,
               "StableLmForCausalLM": T.StableLmConfig, "GraniteForCausalLM": T.GraniteConfig,
               "OlmoForCausalLM": T.OlmoConfig, "Olmo2ForCausalLM": T.Olmo2Config}[arch]
        return cls(**gqa, pad_token_id=0)
    if arch in ("MistralForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM"):
        cls = {"MistralForCausalLM": T.MistralConfig, "Qwen3ForCausalLM": T.Qwen3Config,
               "GemmaForCausalLM": T.GemmaConfig, "Gemma2ForCausalLM": T.Gemma2Config}[arch]
        return cls(**gqa, head_dim=HD, pad_token_id=0)  # their default head_dim (128/256) ignores hidden_size
    if arch == "GPT2LMHeadModel":
        return T.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=128, bos_token_id=0, eos_token_id=0)
    if arch == "GPTNeoXForCausalLM":
        return T.GPTNeoXConfig(**common, pad_token_id=0)  # no GQA in the family
    if arch == "OPTForCausalLM":
        return T.OPTConfig(vocab_size=V, hidden_size=H, ffn_dim=FF, num_hidden_layers=L, num_attention_heads=NH,
                           max_position_embeddings=128, word_embed_proj_dim=H, pad_token_id=1)
    if arch == "FalconForCausalLM":  # Falcon-40B style: new decoder architecture with grouped KV heads
        return T.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                              new_decoder_architecture=True, num_kv_heads=NKV, max_position_embeddings=128,
                              pad_token_id=0)
    text = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=FF,
                max_position_embeddings=128)
    if arch == "BertModel":
        return T.BertConfig(**text, pad_token_id=0)
    if arch == "RobertaModel":
        return T.RobertaConfig(**text, pad_token_id=1)
    if arch == "XLMRobertaModel":
        return T.XLMRobertaConfig(**text, pad_token_id=1)
    if arch == "ElectraModel":
        return T.ElectraConfig(**text, embedding_size=H, pad_token_id=0)
    if arch == "DistilBertModel":
        return T.DistilBertConfig(vocab_size=V, dim=H, n_layers=L, n_heads=NH, hidden_dim=FF,
                                  max_position_embeddings=128, pad_token_id=0)
    vision = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=H, num_hidden_layers=L,
                  num_attention_heads=NH)
    if arch == "ViTModel":
        return T.ViTConfig(**vision, intermediate_size=FF)
    if arch == "DeiTModel":
        return T.DeiTConfig(**vision, intermediate_size=FF)
    if arch == "Dinov2Model":
        return T.Dinov2Config(**vision, mlp_ratio=FF // H)
    raise KeyError(arch)


def build(arch: str):
    import torch
    import transformers as T

    cfg = _config(arch)
    # Gemma-2 refuses SDPA in this transformers (_supports_sdpa False: soft-capped
    # attention); it is built with "eager", the only other choice without flash kernels.
    attn = "eager" if arch == "Gemma2ForCausalLM" else "sdpa"
    torch.manual_seed(0)
    model = getattr(T, arch)._from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def inputs(arch: str, g):
    """(example_inputs, calibration): calibration is a list of input tuples like the
    example (LMs: token ids of 32; encoders: the example's shape, which the forward
    program is captured at)."""
    import torch

    if arch in DECODERS:
        example = (torch.randint(0, V, (1, 16), generator=g),)
        calib = [(torch.randint(0, V, (1, 32), generator=g),) for _ in range(N_CALIB)]
    elif arch in VISION:
        example = (torch.randn(2, 3, 32, 32, generator=g),)
        calib = [(torch.randn(2, 3, 32, 32, generator=g),) for _ in range(N_CALIB)]
    else:
        mk = lambda: (torch.randint(3, V, (2, 16), generator=g), torch.ones(2, 16, dtype=torch.long))
        example = mk()
        calib = [mk() for _ in range(N_CALIB)]
    return example, calib


# ----------------------------------------------------------------------------- worker

def _first_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return lines[0][:400] if lines else ""


def _where(tb) -> dict:
    frames = traceback.extract_tb(tb)
    repo = [f for f in frames if f.filename.startswith(REPO) and "/.venv/" not in f.filename]
    last = frames[-1] if frames else None
    return {"repo": f"{repo[-1].filename[len(REPO) + 1:]}:{repo[-1].lineno} ({repo[-1].name})" if repo else None,
            "raised_at": f"{last.filename}:{last.lineno} ({last.name})" if last else None,
            "repo_stack": [f"{f.filename[len(REPO) + 1:]}:{f.lineno} ({f.name})" for f in repo][-6:]}


def _describe_exc(exc: BaseException) -> list[dict]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append({"type": type(exc).__name__, "msg": _first_line(str(exc)), "full": str(exc)[:3000],
                      **_where(exc.__traceback__)})
        exc = exc.__cause__ or exc.__context__
    return chain


def worker(arch: str, case: str) -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    result = {"arch": arch, "case": case, "transformers": transformers.__version__, "torch": torch.__version__}
    logs: list[str] = []
    start = time.perf_counter()
    try:
        if not hasattr(transformers, arch):
            result.update(status="skipped", reason=f"transformers {transformers.__version__} has no {arch}")
            return
        import optc

        model = build(arch)
        example, calib = inputs(arch, torch.Generator().manual_seed(1))
        with torch.no_grad():
            model(*example)  # the model runs eagerly
        art = optc.compile(model, example, target="cpu", passes=dict(CASES[case]), calibration=calib,
                           max_cache_len=MAX_CACHE_LEN, verify=True, log=logs.append)
        m = art.manifest
        result.update(status="ok", passes=[{k: e.get(k) for k in ("name", "applied", "reason")} for e in m["passes"]],
                      anatomy={"n_blocks": m["anatomy"]["n_blocks"], "reason": m["anatomy"]["reason"],
                               "blocks0": (m["anatomy"]["blocks"] or [None])[0]},
                      verification={k: (v if isinstance(v, str) else {kk: vv for kk, vv in v.items()
                                                                      if kk in ("ok", "max_rel_err", "tolerance")})
                                    for k, v in m["verification"].items()},
                      params=m["params"], task=m["model"]["task"])
        if case != "default":
            name = next(iter(CASES[case])).split(".")[0]
            entry = next(e for e in m["passes"] if e["name"] == name)
            result.update(applied=entry["applied"], reason=entry["reason"])
    except BaseException as exc:  # noqa: BLE001 - the survey records everything
        result.update(status="error", error=_describe_exc(exc), traceback=traceback.format_exc()[-6000:])
    finally:
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["log_tail"] = logs[-12:]
        print(MARK + json.dumps(result, default=str), flush=True)  # the driver reads this line


# ----------------------------------------------------------------------------- driver

def run_one(arch: str, case: str, timeout: int) -> dict:
    log = RESULTS / f"{arch}__{case}.log"
    env = dict(os.environ, OPTC_CACHE_DIR=str(HERE / "optc-cache"), TORCHINDUCTOR_CACHE_DIR=str(HERE / "inductor-cache"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "--worker", arch, case], cwd=str(HERE),
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the worker's own process group only
            proc.wait()
            return {"arch": arch, "case": case, "status": "timeout", "seconds": timeout}
    text = log.read_text()
    found = [line[len(MARK):] for line in text.splitlines() if line.startswith(MARK)]
    if found and rc == 0:
        return json.loads(found[-1])
    return {"arch": arch, "case": case, "status": "crash", "rc": rc, "tail": text[-1500:],
            "seconds": round(time.perf_counter() - start, 1)}


def cell(r: dict) -> str:
    s = r["status"]
    if s == "ok":
        if r["case"] == "default":
            return "ok"
        return "applied" if r.get("applied") else f"not-applied: {(r.get('reason') or '')[:90]}"
    if s == "error":
        e = r["error"][0]
        inner = r["error"][-1]
        where = next((x["repo"] for x in r["error"] if x["repo"]), None)
        return f"ERR {e['type']}: {e['msg'][:90]} [{where}]" + ("" if inner is e else f" <- {inner['type']}")
    if s == "skipped":
        return "skipped"
    return s


def main() -> None:
    global HERE, RESULTS
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", help="folder for the results (the driver only)")
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--only", default="")
    ap.add_argument("--cases", default="")
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker)
        return
    if not a.out:
        ap.error("give the folder for the results: arch_survey.py OUT_DIR")
    HERE = Path(a.out).resolve()
    RESULTS = HERE / "results"
    RESULTS.mkdir(parents=True, exist_ok=True)
    archs = [x for x in DECODERS + ENCODERS if not a.only or x in a.only.split(",")]
    todo = [(arch, c) for arch in archs for c in (DEC_CASES if arch in DECODERS else ENC_CASES)
            if not a.cases or c in a.cases.split(",")]
    results = []

    def go(item):
        r = run_one(*item, a.timeout)
        print(f"{r['arch']:22s} {r['case']:13s} {r.get('seconds', '?'):>6} s  {cell(r)}", flush=True)
        return r

    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(go, todo))
    allr = {(r["arch"], r["case"]): r for r in results}
    lines = ["| arch | " + " | ".join(ENC_CASES) + " |", "|---" * (len(ENC_CASES) + 1) + "|"]
    for arch in DECODERS + ENCODERS:
        row = [cell(allr[(arch, c)]) if (arch, c) in allr else "-" for c in ENC_CASES]
        lines.append(f"| {arch} | " + " | ".join(row) + " |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the result envelope
    from harness import write_result

    write_result(HERE / "arch_survey_cpu.json", {"cases": sorted(allr.values(), key=lambda r: (r["arch"], r["case"])),
                                                 "table": lines}, device="cpu")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
