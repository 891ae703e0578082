"""What machine a session ran on: OUT/device.txt (for people) and OUT/device.json (for
bench.headline), written atomically.

    python -m bench.device_info OUT

GPU name, compute capability, memory and multiprocessors; torch / triton / CUDA /
transformers / peft versions; host CPU count, host memory total and available (the
memory planner's pinned-host budget comes from the latter); the autotuning policy and
Triton cache settings the steps run with; the UTC date.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path


def describe() -> dict:
    import torch
    from bench.common import _version, bench_device
    from anita_core.memory.budget import available_host_bytes
    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "triton": _version("triton") or "absent", "cpus": os.cpu_count(),
            "host_memory_available_bytes": available_host_bytes(),
            "autotune": os.environ.get("ANITA_AUTOTUNE", "full"),
            "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", "triton's default"),
            "triton_cache_autotuning": os.environ.get("TRITON_CACHE_AUTOTUNING", "0")}
    for name in ("transformers", "peft", "bitsandbytes", "liger-kernel"):
        info[name] = _version(name) or "absent"
    try:
        info["host_memory_total_bytes"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        info["host_memory_total_bytes"] = None
    device = bench_device()
    info["cuda_device"] = device.type == "cuda"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"sm_{p.major}{p.minor}",
                    memory_bytes=p.total_memory, multiprocessors=p.multi_processor_count)
    else:
        import csrc_triton
        info.update(device=f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
                    runtime=csrc_triton.runtime_description())
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.device_info OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    info = describe()
    text = "\n".join(f"{k}: {v}" for k, v in info.items()) + "\n"
    for name, body in (("device.json", json.dumps(info, indent=1)), ("device.txt", text)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(body)
        tmp.replace(out / name)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
