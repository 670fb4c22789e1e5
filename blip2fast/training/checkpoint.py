"""Checkpoints that never lose work: written atomically, found by `latest`, loaded without unpickling anything.

Layout of `<run dir>/checkpoints/step_<8 digits>/`:

    model.safetensors        the trainable weights (fp32 masters), plus any frozen tower that was randomly
                             initialised (no file could rebuild it); names are blip2fast's parameter names
    optimizer.safetensors    AdamW state per parameter name: "<name>/exp_avg", "<name>/exp_avg_sq", "<name>/step"
    optimizer.json           the parameter groups (names, hyperparameters) the state belongs to
    trainer.json             step, schedule, samples seen, the resolved config, the last metrics
    data_rank<r>.json        rank r's data-loader position (ShardLoader.state_dict(): plain ints)
    rng_rank<r>.json         rank r's Python and NumPy RNG states
    rng_rank<r>.safetensors  rank r's torch CPU and CUDA RNG states (uint8 tensors)
    meta.json                written last: format, step, world size, file list

Everything is safetensors or JSON: loading runs no pickle at all (`torch.load(weights_only=True)` is used only for
user-supplied `.pth`/`.bin` weight files, see `read_state_dict_file`).

Atomic write: every rank writes its files into `checkpoints/.tmp-step_<N>/`, each file flushed and fsynced; then
rank 0 writes meta.json, fsyncs the folder and renames it to `step_<N>` (one atomic rename on POSIX) and fsyncs
the parent. A kill at any moment leaves either the complete new checkpoint or a `.tmp-*` folder that `latest`
ignores and the next save removes. Only the newest `keep` complete checkpoints are kept; an old one is renamed to
`.trash-*` before it is deleted, so a half-deleted folder never looks like a checkpoint.

Test hook: BLIP2FAST_CKPT_WRITE_SLEEP=<seconds> sleeps inside the write (after model.safetensors, before the
rest and the rename), so a test can kill the process while a checkpoint is half written.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINTS = "checkpoints"
FORMAT = "blip2fast-checkpoint"
VERSION = 1
META = "meta.json"
MODEL = "model.safetensors"
_STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
SLEEP_ENV = "BLIP2FAST_CKPT_WRITE_SLEEP"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------------------------ durable files
def _fsync_path(path: str) -> None:
    """fsync a file or a directory (directories: so a rename / new entry survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_tensors(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    _fsync_path(path)


# ------------------------------------------------------------------------------------------------ finding
def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def is_complete(path: str) -> bool:
    """A checkpoint folder with its meta.json (written last) naming a file set that is all present."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        return False
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        return False
    return meta.get("format") == FORMAT and all(os.path.isfile(os.path.join(path, f)) for f in meta.get("files", []))


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run folder as (step, path), oldest first; partial writes are never listed."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and is_complete(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(path: str) -> str:
    """A checkpoint folder from a checkpoint folder, a run folder (its latest) or a run's `checkpoints/` folder."""
    if is_complete(path):
        return path
    for run_dir in (path, os.path.dirname(os.path.normpath(path))):
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            return latest
    if os.path.isdir(path) and os.path.basename(os.path.normpath(path)).startswith(TMP_PREFIX):
        raise FileNotFoundError(f"{path!r} is a checkpoint that was never completed (its writer was killed); use "
                                "a complete step_* folder or --resume=latest")
    raise FileNotFoundError(f"no complete blip2fast checkpoint at {path!r} (expected a step_* folder with meta.json, "
                            "or a run folder holding checkpoints/step_*)")


# ------------------------------------------------------------------------------------------------ pieces
def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (DTensor: an all-gather every rank must join), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model_tensors(model: nn.Module, extra_prefixes: tuple = ()) -> dict:
    """The tensors a checkpoint keeps: parameters that require grad, plus every parameter and buffer under
    `extra_prefixes` (frozen towers that were randomly initialised). FSDP2-sharded tensors come back whole, so
    with a sharded tower every rank must call this (same order everywhere: the state dict's)."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if extra_prefixes:
        for n, t in model.state_dict().items():
            if n.startswith(tuple(p + "." for p in extra_prefixes)):
                out[n] = t
    return {n: _full(t) for n, t in out.items()}


def load_model_tensors(model: nn.Module, tensors: dict, where: str) -> None:
    """Copy checkpoint tensors into `model` by name; every trainable parameter must be there with its shape."""
    params = dict(model.named_parameters())
    state = model.state_dict()
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    unknown = sorted(n for n in tensors if n not in state)
    bad = [f"{n}: checkpoint {tuple(t.shape)} vs model {tuple(state[n].shape)}" for n, t in tensors.items()
           if n in state and tuple(t.shape) != tuple(state[n].shape)]
    if missing or unknown or bad:
        parts = []
        if missing:
            parts.append(f"trainable parameters missing from the checkpoint: {', '.join(missing[:10])}")
        if unknown:
            parts.append(f"checkpoint tensors the model does not have: {', '.join(unknown[:10])}")
        if bad:
            parts.append("shape mismatches: " + "; ".join(bad[:10]))
        raise ValueError(f"{where} does not fit this model ({'; '.join(parts)}); resume with the config the run "
                         "was started with (its config.json)")
    with torch.no_grad():
        for n, t in tensors.items():
            target = state[n]
            if hasattr(target, "device_mesh"):  # an FSDP2 shard: keep this rank's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t.to(target.device_mesh.device_type), target.device_mesh, target.placements)
            target.copy_(t)


def optimizer_files(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, json) for the optimiser: per-parameter state keyed by parameter name, and the groups."""
    sd = opt.state_dict()
    tensors, scalars, groups = {}, {}, []
    for g_saved, g in zip(sd["param_groups"], opt.param_groups):
        names = g["names"]
        for idx, name in zip(g_saved["params"], names):
            for k, v in sd["state"].get(idx, {}).items():
                if torch.is_tensor(v):
                    tensors[f"{name}/{k}"] = v
                else:
                    scalars.setdefault(name, {})[k] = v
        # a tensor lr (the step's device lr) is saved as its value (JSON); the schedule rewrites it every step
        groups.append({k: (list(v) if isinstance(v, tuple) else float(v) if torch.is_tensor(v) else v)
                       for k, v in g_saved.items() if k != "params"})
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_files(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Restore per-parameter state by name into `opt` (built from the current config: its hyperparameters stay,
    apart from the learning rate, which the schedule sets every step)."""
    sd = opt.state_dict()
    saved_names = [n for g in meta["param_groups"] for n in g["names"]]
    current = [n for g in opt.param_groups for n in g["names"]]
    if sorted(saved_names) != sorted(current):
        missing = sorted(set(current) - set(saved_names))[:10]
        extra = sorted(set(saved_names) - set(current))[:10]
        raise ValueError(f"the checkpoint's optimiser covers other parameters (absent: {missing}; unexpected: "
                         f"{extra}); resume with the config the run was started with")
    for g_saved, g_now in zip(meta["param_groups"], opt.param_groups):
        for k in ("weight_decay", "eps", "betas"):
            if k in g_saved and g_now.get(k) is not None and list(np.atleast_1d(g_saved[k])) != \
                    list(np.atleast_1d(g_now[k])):
                warnings.warn(f"optimiser {k} changed since the checkpoint ({g_saved[k]} -> {g_now[k]}); using the "
                              "new value", stacklevel=3)
    state = {}
    for g_saved, g in zip(sd["param_groups"], opt.param_groups):
        for idx, name in zip(g_saved["params"], g["names"]):
            entry = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.split("/", 1)[0] == name}
            entry.update(meta["scalars"].get(name, {}))
            if entry:
                state[idx] = entry
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def rng_files() -> tuple[dict, dict]:
    """(json, tensors) of this process's RNG states: Python, NumPy, torch CPU and every CUDA device's."""
    py = random.getstate()
    npst = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            tensors[f"cuda_{i}"] = torch.cuda.get_rng_state(i)
    return js, tensors


def set_rng(js: dict, tensors: dict) -> None:
    v, state, gauss = js["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for k, t in tensors.items():
            if k.startswith("cuda_") and int(k[5:]) < torch.cuda.device_count():
                torch.cuda.set_rng_state(t, int(k[5:]))


# ------------------------------------------------------------------------------------------------ save / load
def _remove_dir(path: str) -> None:
    """Rename away, then delete: a half-deleted folder never carries a checkpoint name."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, TRASH_PREFIX + name + f"-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial(run_dir: str) -> list[str]:
    """Remove `.tmp-*` / `.trash-*` leftovers of killed writers (call when no save is in flight)."""
    root = checkpoints_dir(run_dir)
    removed = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    return removed


def save_checkpoint(run_dir: str, step: int, *, rank: int, world_size: int, model: Optional[nn.Module] = None,
                    extra_prefixes: tuple = (), optimizer: Optional[torch.optim.Optimizer] = None,
                    trainer_state: Optional[dict] = None, data_state: Optional[dict] = None, keep: int = 3,
                    barrier: Callable[[], None] = lambda: None) -> str:
    """Write checkpoint `step` atomically (see the module docstring) and prune to the newest `keep`. Every rank
    calls it (rank 0 with the model and optimiser); returns the final folder."""
    root = checkpoints_dir(run_dir)
    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, TMP_PREFIX + checkpoint_name(step))
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        clean_partial(run_dir)
        os.makedirs(tmp)
    barrier()
    files = []
    tensors = model_tensors(model, extra_prefixes) if model is not None else {}  # every rank: sharded towers
    if rank == 0:
        write_tensors(os.path.join(tmp, MODEL), tensors, {"step": str(step)})
        files.append(MODEL)
        sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
        if sleep > 0:
            time.sleep(sleep)  # test hook: a kill now leaves a half-written checkpoint
        opt_tensors, opt_json = optimizer_files(optimizer)
        write_tensors(os.path.join(tmp, "optimizer.safetensors"), opt_tensors)
        write_json(os.path.join(tmp, "optimizer.json"), opt_json)
        write_json(os.path.join(tmp, "trainer.json"), trainer_state or {})
        files += ["optimizer.safetensors", "optimizer.json", "trainer.json"]
    write_json(os.path.join(tmp, f"data_rank{rank}.json"), data_state or {})
    rng_json, rng_tensors = rng_files()
    write_json(os.path.join(tmp, f"rng_rank{rank}.json"), rng_json)
    write_tensors(os.path.join(tmp, f"rng_rank{rank}.safetensors"), rng_tensors)
    barrier()
    if rank == 0:
        for r in range(world_size):
            files += [f"data_rank{r}.json", f"rng_rank{r}.json", f"rng_rank{r}.safetensors"]
        write_json(os.path.join(tmp, META), {"format": FORMAT, "version": VERSION, "step": step,
                                             "world_size": world_size, "files": sorted(files)})
        _fsync_path(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. a resumed run that stopped at once)
            _remove_dir(final)
        os.rename(tmp, final)
        _fsync_path(root)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            _remove_dir(old)
    barrier()
    return final


def load_checkpoint(path: str, rank: int, world_size: int) -> dict:
    """The parts of checkpoint `path` this rank needs: {"model", "optimizer": (tensors, json), "trainer", "data",
    "rng": (json, tensors), "step", "path"}. Safetensors and JSON only."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path!r} is not a complete checkpoint (no meta.json, or files missing)")
    meta = read_json(os.path.join(path, META))
    if meta.get("version") != VERSION:
        raise ValueError(f"{path!r}: checkpoint format version {meta.get('version')} (this code reads {VERSION})")
    if meta["world_size"] != world_size:
        raise ValueError(f"{path!r} was written by {meta['world_size']} rank(s); this run has {world_size}. The data "
                         "position is per rank: resume with the same number of processes")
    return {
        "path": path,
        "step": meta["step"],
        "model": load_file(os.path.join(path, MODEL)),
        "optimizer": (load_file(os.path.join(path, "optimizer.safetensors")),
                      read_json(os.path.join(path, "optimizer.json"))),
        "trainer": read_json(os.path.join(path, "trainer.json")),
        "data": read_json(os.path.join(path, f"data_rank{rank}.json")),
        "rng": (read_json(os.path.join(path, f"rng_rank{rank}.json")),
                load_file(os.path.join(path, f"rng_rank{rank}.safetensors"))),
    }


def read_state_dict_file(path: str) -> dict:
    """Tensors of a user-supplied weight file: safetensors, or a torch file loaded with weights_only=True (no
    arbitrary unpickling); a {"model": ...} / {"state_dict": ...} wrapper is unwrapped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} does not exist")
    if path.endswith(".safetensors"):
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    return obj


# ------------------------------------------------------------------------------------------------ HF export
def export_hf(model: nn.Module, out: str, kind: Optional[str] = None) -> tuple[str, list[str]]:
    """`model.save_pretrained` into `out`, atomically (a temp folder renamed over the old export). Returns the
    folder and the warnings the export raised (what the transformers layout leaves out, eps changes)."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, TMP_PREFIX + os.path.basename(out))
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp, kind=kind)
    for name in os.listdir(tmp):
        if os.path.isfile(os.path.join(tmp, name)):
            _fsync_path(os.path.join(tmp, name))
    if os.path.exists(out):
        _remove_dir(out)
    os.rename(tmp, out)
    _fsync_path(parent)
    return out, [str(w.message) for w in caught]


__all__ = ["checkpoint_name", "clean_partial", "export_hf", "find_checkpoint", "is_complete", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "load_model_tensors", "load_optimizer_files", "model_tensors",
           "optimizer_files", "read_state_dict_file", "rng_files", "save_checkpoint", "set_rng"]
