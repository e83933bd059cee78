"""Fuzzing sensiquant checkpoints, and killing saves with SIGKILL.

Fuzz (``--n``, default 1000): random seeded mutations of a tiny checkpoint (safetensors header bytes, header fields,
the length prefix, tensor bytes, manifest fields and bytes, config.json fields, truncation, appended bytes, deleted
files, files swapped in from another checkpoint). Each case is loaded as a user would (``sensiquant.io.load_model``),
then verified, then run, and classified:

- ``rejected_at_load``: loading raised one SensiquantError;
- ``caught_by_verify``: it loaded, and ``verify_checkpoint`` raised a SensiquantError;
- ``equal_logits``: it loaded, verified, and its logits equal the original's exactly (a mutation of unused data);
- ``FAILURE``: any other exception (a traceback), a hang (the per-case time limit), a crash, or logits that differ
  from the original's with no error from load or verify.

The cases run in a child process; the parent enforces the per-case time limit, and after a hang or a crash marks
that case and goes on in a new child from the next one.

Kills (``--kills``, default 100): a saver process saves two different quantized models A (4-bit) and B (2-bit) in
turn over one directory; the parent kills it with SIGKILL at a random moment, then the directory must verify and load
with the exact logits of A or of B: the one before the interrupted save (old) or the one it was writing (new).
Savers are forked from a preloaded fork server, so a kill costs a fraction of a second, not a Python start.

    python -m bench.fuzz_checkpoint [--n 1000] [--kills 100] [--seed 0] [--out bench/results/fuzz_checkpoint.json]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.tiny_model import save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CLASSES = ("rejected_at_load", "caught_by_verify", "equal_logits", "FAILURE")
PROMPT_IDS = list(range(3, 250, 7))  # 36 tokens of the byte vocabulary
_MARK = "@@fuzz "


# ------------------------------------------------------------------------------------------------ tiny checkpoints


def make_checkpoints(model_dir: Path, work: Path) -> tuple[Path, Path]:
    """Two checkpoints of the same model: A, which stores every kind of tensor (4-bit codes with FP16 scales and
    zeros, 3-bit codes with 8-bit metadata, FP16 CSR outliers, block outliers, an extra file), and B, plain 2-bit."""
    import sensiquant as sq
    from sensiquant.methods.outliers import OutlierConfig

    a_config = sq.QuantConfig(default=sq.LayerSpec(grid="rtn", bits=4, group_size=32, outlier_ratio=0.01),
                              overrides={f"model.layers.{i}.mlp.down_proj":
                                         sq.LayerSpec(grid="hqq", bits=3, group_size=64, quant_meta=True,
                                                      outlier_ratio=0.02, outlier_format="block")
                                         for i in range(2)},
                              outliers=OutlierConfig("magnitude"))
    b_config = sq.QuantConfig(default=sq.LayerSpec(grid="rtn", bits=2, group_size=32))
    paths = []
    for name, config in (("A", a_config), ("B", b_config)):
        model, tok, report = sq.api.quantize(str(model_dir), config, progress=False)
        extra = {"plan.json": json.dumps({"note": "an extra file", "model": name})} if name == "A" else None
        paths.append(sq.io.save_quantized(model, tok, work / name, config, report, extra_files=extra))
    return paths[0], paths[1]


def logits_of(model):
    import torch

    with torch.inference_mode():
        return model(torch.tensor([PROMPT_IDS])).logits


# ------------------------------------------------------------------------------------------------------ mutations


def read_raw_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw_safetensors(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _nodes(obj, prefix=()):
    """Every (path, value) below the root of a JSON tree."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield prefix + (key,), value
        yield from _nodes(value, prefix + (key,))


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def _mutated_value(rng: random.Random, value):
    if isinstance(value, bool):
        return rng.choice([not value, int(value), None, str(value).lower()])
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, value * 2, 0, -1, value + rng.randint(2, 1000), str(value), None,
                           value + 0.5, 2**63])
    if isinstance(value, float):
        return rng.choice([value * 1.5, -value, 0.0, value + 1e-3, None, "x", int(value), math.inf])
    if isinstance(value, str):
        if value and all(c in "0123456789abcdef" for c in value):  # a digest: change one hex digit
            i = rng.randrange(len(value))
            return value[:i] + rng.choice([c for c in "0123456789abcdef" if c != value[i]]) + value[i + 1:]
        return rng.choice([value + "x", "", value[:-1], "F16", "U8", "rtn", "hqq", None, 1])
    if value is None:
        return rng.choice([0, "x", {}, 64])
    if isinstance(value, list):
        return rng.choice([value[:-1], value + [1], [], None, list(reversed(value)), [0] * len(value)])
    if isinstance(value, dict):
        if value and rng.random() < 0.6:
            drop = rng.choice(sorted(value, key=str))
            return {k: v for k, v in value.items() if k != drop}
        return rng.choice([{**value, "bogus": 1}, None, [], {}])
    return None


def _set_or_delete(rng: random.Random, root, path, value_rng=None) -> str:
    parent, key = _get(root, path[:-1]), path[-1]
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[key]
        return f"delete {'.'.join(map(str, path))}"
    new = _mutated_value(value_rng or rng, parent[key])
    parent[key] = new
    return f"set {'.'.join(map(str, path))} = {json.dumps(new)[:60]}"


def _targeted_manifest(rng: random.Random, manifest: dict) -> str:
    """Mutations aimed at the fields that change how tensors are decoded."""
    layer = rng.choice(sorted(manifest["layers"]))
    entry = manifest["layers"][layer]
    spec = entry["spec"]
    choice = rng.randrange(9)
    if choice == 0:
        spec["bits"] = rng.choice([b for b in (2, 3, 4, 8) if b != spec["bits"]])
        return f"{layer} bits -> {spec['bits']}"
    if choice == 1:
        spec["group_size"] = rng.choice([g for g in (16, 31, 33, 48, 64, 128, None) if g != spec["group_size"]])
        return f"{layer} group_size -> {spec['group_size']}"
    if choice == 2:
        spec["quant_meta"] = not spec["quant_meta"]
        return f"{layer} quant_meta -> {spec['quant_meta']}"
    if choice == 3:
        spec["meta_group_size"] = rng.choice([64, 100, 127, 129, 256])
        return f"{layer} meta_group_size -> {spec['meta_group_size']}"
    if choice == 4:
        entry["shape"] = list(reversed(entry["shape"])) if rng.random() < 0.5 else [entry["shape"][0],
                                                                                    entry["shape"][1] + 1]
        return f"{layer} shape -> {entry['shape']}"
    if choice == 5:
        entry["n_outliers"] = max(0, entry.get("n_outliers", 0) + rng.choice([-1, 1, 100]))
        return f"{layer} n_outliers -> {entry['n_outliers']}"
    if choice == 6:
        name = rng.choice(sorted(manifest["tensors"]))
        tensor = manifest["tensors"][name]
        field = rng.choice(["dtype", "shape", "nbytes"])
        tensor[field] = {"dtype": rng.choice(["F16", "F32", "BF16", "U8", "I16"]),
                         "shape": list(reversed(tensor["shape"])) + ([1] if rng.random() < 0.3 else []),
                         "nbytes": tensor["nbytes"] + rng.choice([-2, 2, 8])}[field]
        return f"tensor {name} {field} -> {tensor[field]}"
    if choice == 7:
        spec["outlier_format"] = {"csr": "block", "block": "csr"}.get(spec.get("outlier_format"), "csr")
        return f"{layer} outlier_format -> {spec['outlier_format']}"
    manifest["format_version"] = rng.choice([1, 3, "2", None])
    return f"format_version -> {manifest['format_version']}"


KINDS = {  # kind -> weight
    "header_byte": 12, "header_length": 3, "header_field": 12, "tensor_bytes": 14, "truncate": 8, "append": 3,
    "delete": 6, "manifest_field": 12, "manifest_targeted": 10, "manifest_bytes": 6, "config_field": 6, "mix": 8,
}


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes()
                                                                for n in names)


def mutate(case: Path, base: Path, other: Path, seed: int, index: int) -> dict:
    """Make ``case`` a mutated copy of ``base``, as case ``index`` of run ``seed`` says (draws that change no byte,
    such as a value set to what it was, are drawn again); returns the mutation's description."""
    for attempt in range(50):
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(base, case)
        mutation = apply_mutation(case, other, random.Random(f"{seed}-{index}-{attempt}"))
        if not _same_files(case, base):
            return mutation
    raise RuntimeError(f"case {index}: 50 draws in a row changed nothing")


def apply_mutation(case: Path, other: Path, rng: random.Random) -> dict:
    """Apply one random mutation to the checkpoint directory ``case``; returns its description."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    weights = case / "model.safetensors"
    files = sorted(p.name for p in case.iterdir())
    detail = ""
    if kind in ("header_byte", "header_length", "tensor_bytes"):
        data = bytearray(weights.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        if kind == "header_length":
            new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), len(data) - 7, 2**40, 2**63, 100 * 2**20 + 1,
                              rng.randrange(2**64)])
            data[:8] = struct.pack("<Q", new)
            detail = f"header length {n} -> {new}"
        else:
            lo, hi = (0, 8 + n) if kind == "header_byte" else (8 + n, len(data))
            count = 1 if kind == "header_byte" else rng.choice([1, 1, 2, 4, 16])
            for _ in range(count):
                pos = rng.randrange(lo, hi)
                if rng.random() < 0.5:
                    data[pos] ^= 1 << rng.randrange(8)
                else:
                    data[pos] = rng.choice([b for b in b'0123456789{}[]",: Fx' if b != data[pos]]) \
                        if kind == "header_byte" else rng.randrange(256)
                detail += f"byte {pos} "
        weights.write_bytes(bytes(data))
    elif kind == "header_field":
        header, body = read_raw_safetensors(weights)
        name = rng.choice(sorted(header))
        if name == "__metadata__" or rng.random() < 0.1:
            meta = header.setdefault("__metadata__", {})
            key = rng.choice(sorted(meta) or ["format"])
            detail = _set_or_delete(rng, header, ("__metadata__", key)) if key in meta else "metadata"
        else:
            info = header[name]
            action = rng.randrange(6)
            if action == 0:
                info["dtype"] = rng.choice(["F16", "F32", "BF16", "U8", "I8", "I16", "I32", "F64", "Q4", "bool"])
                detail = f"{name} dtype -> {info['dtype']}"
            elif action == 1:
                shape = info["shape"]
                info["shape"] = rng.choice([list(reversed(shape)), shape + [1], shape[:-1], [-1] + shape[1:],
                                            [s * 2 for s in shape], [1.5] * len(shape), "96"])
                detail = f"{name} shape -> {info['shape']}"
            elif action == 2:
                begin, end = info["data_offsets"]
                info["data_offsets"] = rng.choice([[begin + 1, end], [begin, end + 1], [begin - 8, end - 8],
                                                   [end, begin], [begin, 2**62], [begin], [-1, end], [begin, None]])
                detail = f"{name} data_offsets -> {info['data_offsets']}"
            elif action == 3:
                del header[name]
                detail = f"drop {name}"
            elif action == 4:
                header[name[:-1] + "X"] = header.pop(name)
                detail = f"rename {name}"
            else:
                other_name = rng.choice(sorted(k for k in header if k != "__metadata__"))
                header[name]["data_offsets"], header[other_name]["data_offsets"] = \
                    header[other_name]["data_offsets"], header[name]["data_offsets"]
                detail = f"swap offsets of {name} and {other_name}"
        write_raw_safetensors(weights, header, body)
    elif kind in ("truncate", "append", "delete"):
        target = case / ("model.safetensors" if rng.random() < 0.5 else rng.choice(files))
        size = target.stat().st_size
        if kind == "truncate":
            new = rng.choice([0, rng.randrange(8), rng.randrange(size), size - 1])
            os.truncate(target, new)
            detail = f"{target.name} {size} -> {new} bytes"
        elif kind == "append":
            extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 8, 100])))
            with open(target, "ab") as f:
                f.write(extra)
            detail = f"{target.name} + {len(extra)} bytes"
        else:
            target.unlink()
            detail = target.name
    elif kind in ("manifest_field", "manifest_targeted", "config_field"):
        file = case / ("config.json" if kind == "config_field" else "sensiquant.json")
        doc = json.loads(file.read_text())
        if kind == "manifest_targeted":
            detail = _targeted_manifest(rng, doc)
        elif kind == "config_field" and rng.random() < 0.2:
            doc.pop("quantization_config", None)
            detail = "drop quantization_config"
        else:
            path = rng.choice([p for p, _ in _nodes(doc)])
            detail = _set_or_delete(rng, doc, path)
        file.write_text(json.dumps(doc, indent=2))
    elif kind == "manifest_bytes":
        file = case / "sensiquant.json"
        data = bytearray(file.read_bytes())
        pos = rng.randrange(len(data))
        data[pos] = rng.choice([b for b in b'0123456789{}[]",:. xe-' if b != data[pos]])
        file.write_bytes(bytes(data))
        detail = f"byte {pos}"
    else:  # mix: one file from the other checkpoint, as a save interrupted between files would leave
        name = rng.choice(["model.safetensors", "sensiquant.json", "config.json", "tokenizer.json"])
        shutil.copyfile(other / name, case / name)
        detail = f"{name} from the other checkpoint"
    return {"kind": kind, "detail": detail.strip()}


# ------------------------------------------------------------------------------------------------- fuzz: the child


def classify(case: Path, reference) -> tuple[str, str]:
    """(class, detail) of one mutated checkpoint: see the module docstring."""
    import torch

    from sensiquant import SensiquantError
    from sensiquant.io import load_model, verify_checkpoint

    try:
        model, _ = load_model(str(case))
    except SensiquantError as exc:
        return "rejected_at_load", str(exc)
    except Exception:  # the fuzzer's whole point: any other exception is a finding
        return "FAILURE", "load raised " + traceback.format_exc(limit=-3)
    try:
        verify_checkpoint(case)
        verify_error = None
    except SensiquantError as exc:
        verify_error = str(exc)
    except Exception:
        return "FAILURE", "verify raised " + traceback.format_exc(limit=-3)
    try:
        logits = logits_of(model)
    except Exception:
        return "FAILURE", "the loaded model raised " + traceback.format_exc(limit=-3)
    if verify_error is not None:
        return "caught_by_verify", verify_error
    if torch.equal(logits, reference):
        return "equal_logits", ""
    return "FAILURE", f"logits differ by {float((logits - reference).abs().max()):.3g} without any error"


def fuzz_child(base: Path, other: Path, work: Path, seed: int, start: int, stop: int) -> None:
    from sensiquant.io import load_model

    model, _ = load_model(str(base), verify=True)
    reference = logits_of(model)
    assert bool(reference.isfinite().all()), "the base checkpoint's logits are not finite"
    print(_MARK + json.dumps({"ready": True}), flush=True)
    # the harness's own test: "hang=I,crash=J" makes case I hang and case J kill its process
    selftest = dict(item.split("=") for item in os.environ.get("SENSIQUANT_FUZZ_SELFTEST", "").split(",") if item)
    for index in range(start, stop):
        case = work / f"case-{index}"
        mutation = mutate(case, base, other, seed, index)
        print(_MARK + json.dumps({"start": index, **mutation}), flush=True)
        if selftest.get("hang") == str(index):
            time.sleep(3600)
        if selftest.get("crash") == str(index):
            os._exit(3)
        started = time.perf_counter()
        cls, detail = classify(case, reference)
        shutil.rmtree(case, ignore_errors=True)
        print(_MARK + json.dumps({"i": index, **mutation, "class": cls, "message": detail[:400],
                                  "seconds": round(time.perf_counter() - started, 4)}), flush=True)


# ------------------------------------------------------------------------------------------------ fuzz: the parent


def run_fuzz(base: Path, other: Path, work: Path, n: int = 1000, seed: int = 0, case_timeout: float = 30.0,
             start_timeout: float = 300.0, log=None) -> dict:
    """Fuzz ``n`` cases in child processes; the counts per class (and per kind), failures listed."""
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    started = time.perf_counter()
    index = 0
    while index < n:
        cmd = [sys.executable, "-m", "bench.fuzz_checkpoint", "--fuzz-child", str(base), str(other), str(work),
               str(seed), str(index), str(n)]
        with open(work / "child.stderr", "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                    env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            ready, current = False, {"kind": "?", "detail": ""}
            deadline = time.monotonic() + start_timeout
            while index < n:
                remaining = deadline - time.monotonic()
                readable = select.select([proc.stdout], [], [], max(remaining, 0))[0] if remaining > 0 else []
                if not readable:  # a hang: kill the child (ours), mark the case, go on with a new one
                    proc.kill()
                    proc.wait()
                    reason = f"hang (no answer in {case_timeout if ready else start_timeout:.0f} s)"
                    if not ready:
                        raise RuntimeError(f"the fuzz child did not start: {reason}")
                    results.append({"i": index, **current, "class": "FAILURE", "message": reason})
                    index += 1
                    break
                line = proc.stdout.readline()
                if not line:  # the child died: a crash of the current case
                    code = proc.wait()
                    tail = (work / "child.stderr").read_text()[-1500:]
                    if not ready:
                        raise RuntimeError(f"the fuzz child failed to start (exit {code}): {tail}")
                    results.append({"i": index, **current, "class": "FAILURE",
                                    "message": f"the process died (exit {code}): {tail[-400:]}"})
                    index += 1
                    break
                if not line.startswith(_MARK):
                    continue
                record = json.loads(line[len(_MARK):])
                deadline = time.monotonic() + case_timeout
                if record.get("ready"):
                    ready = True
                    continue
                if "start" in record:
                    current = {"kind": record["kind"], "detail": record["detail"]}
                    continue
                results.append(record)
                index = record["i"] + 1
                if log is not None and (index % 100 == 0 or record["class"] == "FAILURE"):
                    log(f"{index}/{n} cases, {sum(r['class'] == 'FAILURE' for r in results)} failures")
            if proc.poll() is None:
                proc.wait(timeout=60)
    classes = {c: sum(r["class"] == c for r in results) for c in CLASSES}
    by_kind: dict[str, dict[str, int]] = {}
    for r in results:
        by_kind.setdefault(r["kind"], dict.fromkeys(CLASSES, 0))[r["class"]] += 1
    examples = {}
    for r in results:
        examples.setdefault(f"{r['kind']}/{r['class']}", f"{r.get('detail', '')}: {r['message'][:200]}")
    return {"n": n, "seed": seed, "classes": classes, "by_kind": by_kind,
            "failures": [r for r in results if r["class"] == "FAILURE"], "examples": dict(sorted(examples.items())),
            "max_case_seconds": max((r.get("seconds", 0.0) for r in results), default=0.0),
            "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------------------------------------ kills


def _log_line(fd: int, text: str) -> None:
    os.write(fd, (text + "\n").encode())


def saver(sources: dict[str, str], target: str, first: str, log_path: str) -> None:
    """The saver process: load A and B, then save them in turn (``first`` first) over ``target`` until killed."""
    from sensiquant.io import load_quantized, read_manifest, save_quantized
    from sensiquant.pipeline import QuantConfig

    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    models = {}
    for name, path in sources.items():
        model, tok = load_quantized(path)
        extra = {p.name: p.read_text() for p in Path(path).iterdir() if p.name == "plan.json"}
        models[name] = (model, tok, QuantConfig.from_dict(read_manifest(path)["config"]), model.sensiquant_report,
                        extra or None)
    order = [first, "B" if first == "A" else "A"]
    _log_line(fd, "ready")
    for step in range(10**9):
        name = order[step % 2]
        model, tok, config, report, extra = models[name]
        _log_line(fd, f"begin {name}")
        save_quantized(model, tok, target, config, report, extra_files=extra)
        _log_line(fd, f"end {name}")


def _identify(path: Path, references: dict) -> tuple[str | None, str]:
    """Which of the reference models the checkpoint at ``path`` is ("A", "B"), or None with the reason."""
    import torch

    from sensiquant import SensiquantError
    from sensiquant.io import load_quantized, verify_checkpoint

    try:
        verify_checkpoint(path)
        model, _ = load_quantized(path)
    except SensiquantError as exc:
        return None, f"not a complete checkpoint: {exc}"
    logits = logits_of(model)
    for name, reference in references.items():
        if torch.equal(logits, reference):
            return name, ""
    return None, "its logits equal neither A's nor B's"


def run_kills(a: Path, b: Path, work: Path, kills: int = 100, seed: int = 0, log=None) -> dict:
    """``kills`` rounds of: fork a saver, let it run for a random time, SIGKILL it, check the directory."""
    from sensiquant.io import load_quantized, save_quantized
    from sensiquant.io.atomic import temporary_siblings

    rng = random.Random(seed)
    started = time.perf_counter()
    references = {}
    for name, path in (("A", a), ("B", b)):
        model, _ = load_quantized(path)
        references[name] = logits_of(model)
    # how long one save takes here: the kills are spread over about three of them
    model, tok = load_quantized(a)
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        save_quantized(model, tok, work / "timing", _config_of(a), model.sensiquant_report)
        timings.append(time.perf_counter() - t0)
    save_seconds = sorted(timings)[1]
    target = work / "target"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(a, target)
    state = "A"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["sensiquant.io.checkpoint",
                                "transformers.models.llama.modeling_llama", "accelerate"])
    import bench.fuzz_checkpoint as this  # the saver by its module name, also when this file runs as __main__

    counts = {"kills": kills, "mid_save": 0, "between_saves": 0, "before_first_save": 0, "found_old": 0,
              "found_new": 0, "failures": 0, "stale_temporaries_seen": 0}
    failures = []
    saves_interrupted_after = []
    for k in range(kills):
        log_path = work / f"saver-{k}.log"
        first = "B" if state == "A" else "A"
        proc = ctx.Process(target=this.saver, args=({"A": str(a), "B": str(b)}, str(target), first, str(log_path)))
        proc.start()
        deadline = time.monotonic() + 120
        while not (log_path.is_file() and "ready" in log_path.read_text()):
            if time.monotonic() > deadline or not proc.is_alive():
                proc.kill()
                proc.join()
                raise RuntimeError(f"the saver did not start (exit {proc.exitcode})")
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 3 * save_seconds))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        events = log_path.read_text().split()[1:]
        pairs = list(zip(events[::2], events[1::2], strict=False))
        previous, in_progress = state, None
        for action, name in pairs:
            if action == "end":
                previous, in_progress = name, None
            else:
                in_progress = name
        begins = sum(action == "begin" for action, _ in pairs)
        if in_progress is not None:
            counts["mid_save"] += 1
        elif begins:
            counts["between_saves"] += 1
        else:
            counts["before_first_save"] += 1
        saves_interrupted_after.append(begins)
        counts["stale_temporaries_seen"] += len(temporary_siblings(target))
        found, reason = _identify(target, references)
        if found is None or found not in (previous, in_progress):
            counts["failures"] += 1
            failures.append({"kill": k, "previous": previous, "in_progress": in_progress, "found": found,
                             "reason": reason or f"found {found}, expected {previous} or {in_progress}"})
        elif in_progress is not None:
            counts["found_new" if found == in_progress else "found_old"] += 1
        state = found or state
        log_path.unlink()
        if log is not None and (k + 1) % 25 == 0:
            log(f"{k + 1}/{kills} kills, {counts['failures']} failures")
    # the next save removes what the killed ones left
    model, tok = load_quantized(a)
    save_quantized(model, tok, target, _config_of(a), model.sensiquant_report)
    counts["temporaries_left_after_a_clean_save"] = len(temporary_siblings(target))
    counts["save_seconds"] = round(save_seconds, 4)
    counts["saves_started_per_kill"] = round(sum(saves_interrupted_after) / max(kills, 1), 2)
    counts["seconds"] = round(time.perf_counter() - started, 1)
    counts["failure_list"] = failures
    return counts


def _config_of(path: Path):
    from sensiquant.io import read_manifest
    from sensiquant.pipeline import QuantConfig

    return QuantConfig.from_dict(read_manifest(path)["config"])


# ------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="fuzz cases (0: none)")
    ap.add_argument("--kills", type=int, default=100, help="SIGKILLs of a saver (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the mutations and of the kill moments")
    ap.add_argument("--case-timeout", type=float, default=30.0, help="seconds a fuzz case may take")
    ap.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS / "fuzz_checkpoint.json"), help="results JSON")
    ap.add_argument("--fuzz-child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fuzz_child is not None:
        base, other, work, seed, start, stop = args.fuzz_child
        fuzz_child(Path(base), Path(other), Path(work), int(seed), int(start), int(stop))
        return 0

    from bench.common import write_json

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="fuzz-checkpoint-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        model_dir = save_tiny_llama(work / "tiny-llama")
        a, b = make_checkpoints(model_dir, work)
        result: dict = {"model": "2-layer random LLaMA, hidden 96 (A: 4-bit g32 + CSR outliers, 3-bit meta8 + block "
                                 "outliers; B: 2-bit)"}
        if args.n:
            result["fuzz"] = run_fuzz(a, b, work / "fuzz", args.n, args.seed, args.case_timeout, log=log)
            log(f"fuzz: {json.dumps(result['fuzz']['classes'])}")
        if args.kills:
            result["kill"] = run_kills(a, b, work / "kill", args.kills, args.seed, log=log)
            log(f"kill: {json.dumps({k: v for k, v in result['kill'].items() if k != 'failure_list'})}")
    write_json(Path(args.out), result)
    print(json.dumps({"fuzz": result.get("fuzz", {}).get("classes"),
                      "kill": {k: v for k, v in result.get("kill", {}).items() if k != "failure_list"}}))
    failed = result.get("fuzz", {}).get("classes", {}).get("FAILURE", 0) + result.get("kill", {}).get("failures", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
