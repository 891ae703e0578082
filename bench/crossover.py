"""The fused / dequantize crossover of bench.nf4_matmul's rows (no torch: bench.headline
reads a session's CSV with it)."""
from __future__ import annotations


def crossover_rows(rows) -> list:
    """Per (mode, shape): walking M upwards, the last M at which ours_fused still beats
    ours_dequant+matmul before the first M at which it does not."""
    times: dict = {}
    for r in rows:
        if r["provider"] in ("ours_fused", "ours_dequant+matmul") and r.get("median_ms") not in (
                "", None):
            times.setdefault((r["mode"], r["shape"]), {}).setdefault(int(r["m"]), {})[
                r["provider"]] = float(r["median_ms"])
    out = []
    for (mode, shape), by_m in sorted(times.items()):
        ms = sorted(m for m, t in by_m.items() if len(t) == 2)
        if not ms:
            continue
        fused_up_to, first_loss = "never", "none measured"
        for m in ms:
            if by_m[m]["ours_fused"] >= by_m[m]["ours_dequant+matmul"]:
                first_loss = m
                break
            fused_up_to = m
        out.append({"mode": mode, "shape": shape, "fused wins up to": fused_up_to,
                    "first M where dequant wins": first_loss})
    return out
