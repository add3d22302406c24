"""The one or two sentences each dashboard page leads with, from numbers already computed.

Each function takes what profiler.analysis returned (a Peak, a breakdown, a comparison
table) and returns plain text; nothing here reads a trace. The byte figures are written as
`vramscope report` writes them (profiler.units.human_bytes), so that the Overview's peak
reads the same in both. A page shows its headline first and the evidence below it.
"""

from __future__ import annotations

import pandas as pd

from profiler.analysis.compare import memory_saved_pct, world_size_of
from profiler.analysis.modules import NO_MODULE
from profiler.analysis.stacks import NO_STACK
from profiler.units import human_bytes

NO_STACK_WORTH_SAYING = 0.05  # a share of the peak without a stack that a headline mentions


def _pct(part, whole) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"


def where_peak(peak) -> str:
    """ "at step 1, backward" (an analysis.Peak)."""
    if peak.event_index < 0:
        return "at the start of capture"
    phase = f", {peak.phase}" if peak.phase else ""
    return f"at step {peak.step}{phase}"


def overview(peak, categories: pd.DataFrame, parts: pd.DataFrame, sites: pd.DataFrame) -> str:
    """Peak, where, its largest category, its largest parts (module_parts) and the line holding the most.

    categories: analysis.category_at_peak; parts: modules.module_parts of peak contributions
    (with the remainder); sites: stacks.site_breakdown of the bytes alive at the peak."""
    total = peak.allocated_bytes
    text = f"Peak {human_bytes(total)} allocated {where_peak(peak)}"
    cats = categories[categories["total_bytes"] > 0]
    if len(cats) and total:
        top = cats.iloc[0]
        text += f": {_pct(top['total_bytes'], total)} {top['category']}"
    text += "."
    leaves = _largest_parts(parts)
    if leaves:
        text += " Largest: " + ", then ".join(f"{label} ({human_bytes(b)})" for label, b in leaves[:2]) + "."
    text += _site_sentence(sites, total)
    return text


def _largest_parts(parts: pd.DataFrame) -> list[tuple[str, int]]:
    """The leaves of module_parts (what holds bytes itself), largest first, as (label, bytes)."""
    if parts.empty:
        return []
    parents = set(parts["parent"])
    leaves = parts[~parts["id"].isin(parents)].sort_values("bytes", ascending=False, kind="stable")
    out = []
    for row in leaves.itertuples():
        label = f"{NO_MODULE} {row.label}" if row.kind == "remainder" else row.id if row.kind == "module" else row.label
        out.append((label, int(row.bytes)))
    return out


def _site_sentence(sites: pd.DataFrame, total: int) -> str:
    if sites.empty or not total:
        return ""
    known = sites[sites["site"] != NO_STACK]
    text = ""
    if len(known):
        top = known.iloc[0]
        text += f" The line holding the most: {top['site']} ({human_bytes(int(top['total_bytes']))})."
    missing = int(sites.loc[sites["site"] == NO_STACK, "total_bytes"].sum())
    if missing > NO_STACK_WORTH_SAYING * total:
        text += f" {_pct(missing, total)} of the peak's bytes have no stack."
    return text


def layers(parts: pd.DataFrame, total: int) -> str:
    """The largest part of the peak by module (a module's own bytes count as '<Class>.forward itself'),
    the next one, and the bytes in no module."""
    leaves = [(label, b) for label, b in _largest_parts(parts) if not label.startswith(NO_MODULE)]
    if not leaves or not total:
        return "No module held bytes at the peak."
    (first, size), *rest = leaves
    text = f"{first} holds {human_bytes(size)}, {_pct(size, total)} of the peak"
    if rest:
        text += f"; then {rest[0][0]} ({human_bytes(rest[0][1])})"
    text += "."
    no_module = parts[(parts["id"] == NO_MODULE)]
    if len(no_module):
        kids = parts[parts["parent"] == NO_MODULE].sort_values("bytes", ascending=False).head(2)
        what = ", ".join(f"{r.label} {human_bytes(int(r.bytes))}" for r in kids.itertuples())
        size = int(no_module["bytes"].iloc[0])
        text += f" {human_bytes(size)} ({_pct(size, total)}) is in no module: {what}."
    return text


def categories(at_peak: pd.DataFrame, total: int) -> str:
    """The two largest categories at the peak."""
    d = at_peak[at_peak["total_bytes"] > 0]
    if d.empty or not total:
        return "Nothing was allocated at the peak."
    parts = [
        f"{r.category} {human_bytes(int(r.total_bytes))} ({_pct(r.total_bytes, total)})" for r in d.head(2).itertuples()
    ]
    return f"At the peak ({human_bytes(total)}): " + ", then ".join(parts) + "."


def stacks(sites: pd.DataFrame, total: int) -> str:
    """The allocation site holding the most at the peak, and the share with no stack."""
    if sites.empty or not total:
        return "Nothing was alive at the peak."
    known = sites[sites["site"] != NO_STACK]
    text = ""
    if len(known):
        top = known.iloc[0]
        size = int(top["total_bytes"])
        text = f"{top['site']} holds {human_bytes(size)} at the peak ({_pct(size, total)})."
    missing = int(sites.loc[sites["site"] == NO_STACK, "total_bytes"].sum())
    if missing:
        text += f" {human_bytes(missing)} ({_pct(missing, total)}) has no stack."
    return text.strip()


def kv(summaries: dict[str, pd.DataFrame], waste: pd.DataFrame) -> str:
    """Bytes per token position of each run's caches (kv.kv_summary) and the run that wastes the most
    (kv.kv_waste: mean unused and extra bytes over steps)."""
    per_token = [
        (name, row.cache, float(row.bytes_per_token))
        for name, s in summaries.items()
        for row in s.itertuples()
        if row.bytes_per_token is not None and not pd.isna(row.bytes_per_token)
    ]
    if not per_token:
        return "No cache recorded its tokens."
    lo, hi = min(per_token, key=lambda t: t[2]), max(per_token, key=lambda t: t[2])
    text = f"Bytes per token position: {human_bytes(round(hi[2]))} ({hi[0]}, {hi[1]})"
    if lo[2] != hi[2]:
        text += f" down to {human_bytes(round(lo[2]))} ({lo[0]}, {lo[1]})"
    text += "."
    if len(waste):
        held = waste["token_state_bytes"] + waste["unused_bytes"] + waste["extra_bytes"]
        lost = waste["unused_bytes"] + waste["extra_bytes"]
        i = int(lost.to_numpy().argmax())
        if lost.iloc[i] > 0:
            text += (
                f" Most waste: {waste['run'].iloc[i]} ({waste['cache'].iloc[i]})"
                f" holds {human_bytes(round(lost.iloc[i]))}"
                f" for no token, {_pct(lost.iloc[i], held.iloc[i])} of its cache on average."
            )
        else:
            text += " No cache held bytes for no token."
    return text


def ranks(skew: dict, world_size: int) -> str:
    """The largest rank's peak against the median rank's (ranks.rank_skew)."""
    if skew.get("max_rank") is None:
        return f"No rank of the {world_size} could be read."
    if skew["max_bytes"] == skew["min_bytes"]:
        return f"All {skew.get('ranks') or world_size} ranks peak at {human_bytes(skew['max_bytes'])}: no skew."
    text = (
        f"Rank {skew['max_rank']} peaks highest at {human_bytes(skew['max_bytes'])}, "
        f"rank {skew['min_rank']} lowest at {human_bytes(skew['min_bytes'])}"
    )
    if skew.get("skew_pct") is not None:
        text += f": the largest is {skew['skew_pct']:+.1f}% against the median of {world_size} ranks"
    text += "."
    if skew.get("spread_bytes"):
        text += f" Balancing them would save at most {human_bytes(skew['spread_bytes'])} on the largest."
    return text


def run_kind(summary: dict) -> tuple[str, str, int]:
    """(training or inference, model, world size): what two runs must share to be options of one job.
    A run that held no gradient and no optimizer state is inference."""
    own = summary.get("category_peak_bytes") or {}
    training = bool(own.get("gradient") or own.get("optimizer_state"))
    config = summary.get("config")
    if not isinstance(config, dict):
        config = {}
    model = config.get("model") or config.get("preset") or "?"
    return ("training" if training else "inference", str(model), world_size_of(summary))


def kind_warning(names: list[str], summaries: list[dict]) -> str | None:
    """None when the runs are of one kind, else which runs differ and how."""
    kinds = [run_kind(s) for s in summaries]
    notes = []
    for i, what in enumerate(("train vs inference", "model", "world size")):
        values: dict[str, list[str]] = {}
        for name, k in zip(names, kinds):
            values.setdefault(str(k[i]), []).append(name)
        if len(values) > 1:
            notes.append(f"{what}: " + "; ".join(f"{v} ({', '.join(n)})" for v, n in values.items()))
    if not notes:
        return None
    return "These runs differ in kind, so their memory is not one job's options: " + " | ".join(notes) + "."


SPEED_SIGN = (
    "Speed change is throughput against the baseline (tokens/s, else steps/s): +25% does a quarter more work "
    "per second, -20% is slower."
)


def compare(view: pd.DataFrame, summaries: list[dict], baseline: int, tolerance: float) -> str:
    """The option that saves the most reserved memory (what runs out), with its allocated saving, its
    speed change and the loss check; where none reserves less, the one that allocates least and what
    it reserves. Runs whose loss moves by more than `tolerance` are no options.
    view: compare.ablation_view of `summaries` against `baseline`."""
    base = summaries[baseline]
    options = []  # (index, reserved saved %, allocated saved %)
    for i, s in enumerate(summaries):
        loss = view["loss_delta"].iloc[i] if "loss_delta" in view else None
        if i == baseline or (loss is not None and not pd.isna(loss) and abs(loss) > tolerance):
            continue
        reserved = memory_saved_pct(base.get("peak_reserved_bytes"), s.get("peak_reserved_bytes"))
        allocated = memory_saved_pct(base.get("peak_allocated_bytes"), s.get("peak_allocated_bytes"))
        options.append((i, reserved, allocated))
    base_name = view["name"].iloc[baseline]
    by_reserved = [o for o in options if o[1] is not None and o[1] > 0]
    by_allocated = [o for o in options if o[2] is not None and o[2] > 0]
    if by_reserved:
        best = max(by_reserved, key=lambda o: o[1] or 0.0)[0]
        s = summaries[best]
        text = f"Best option: {view['name'].iloc[best]} saves " + _saving(base, s, "peak_allocated_bytes", "allocated")
        text += " and " + _saving(base, s, "peak_reserved_bytes", "reserved")
    elif by_allocated:
        best = max(by_allocated, key=lambda o: o[2] or 0.0)[0]
        s = summaries[best]
        text = f"Best option: {view['name'].iloc[best]} saves " + _saving(base, s, "peak_allocated_bytes", "allocated")
        if s.get("peak_reserved_bytes") is not None and base.get("peak_reserved_bytes") is not None:
            more = s["peak_reserved_bytes"] - base["peak_reserved_bytes"]
            text += f" but reserves {human_bytes(more)} more" if more > 0 else " and reserves as much"
    else:
        return f"No run here needs less memory than {base_name}" + (
            f" with its loss within {tolerance:g}." if len(options) < len(summaries) - 1 else "."
        )
    return text + _speed_and_loss(view, best, tolerance) + f", against {base_name}."


def _speed_and_loss(view: pd.DataFrame, best: int, tolerance: float) -> str:
    text = ""
    speed = view["speed_change_pct"].iloc[best]
    if speed is not None and not pd.isna(speed):
        text += f", at {speed:+.1f}% speed ({'faster' if speed > 0 else 'slower' if speed < 0 else 'the same'})"
    loss = view["loss_delta"].iloc[best] if "loss_delta" in view else None
    if loss is not None and not pd.isna(loss):
        return text + f"; its loss is within {tolerance:g} of the baseline's ({loss:+.4f})"
    return text + "; no loss was recorded to check"


def _saving(base: dict, run: dict, key: str, word: str) -> str:
    saved = base[key] - run[key]
    return f"{human_bytes(saved)} {word} ({memory_saved_pct(base[key], run[key]):.0f}%)"


def unchanged(names: list[str], sites: list[pd.DataFrame], least: int = 1 << 20) -> str | None:
    """What no run changed: the allocation sites holding the same bytes at every run's peak
    (stacks.site_breakdown of each), largest first; None when there is none of `least` bytes."""
    if len(sites) < 2 or any(s.empty for s in sites):
        return None
    columns = [s[s["site"] != NO_STACK].set_index("site")["total_bytes"].rename(i) for i, s in enumerate(sites)]
    merged = pd.concat(columns, axis=1, join="inner")
    same = merged[(merged.nunique(axis=1) == 1) & (merged[0] >= least)][0].sort_values(ascending=False)
    if same.empty:
        return None
    listed = ", ".join(f"{site} ({human_bytes(int(b))})" for site, b in same.head(3).items())
    return f"No option changed {human_bytes(int(same.sum()))} at the peak, the same in all {len(names)} runs: {listed}."


def runs(names: list[str], peaks: list, unreadable: int) -> str:
    """How many runs, the largest peak among them, and how many could not be read."""
    known = [(p, n) for p, n in zip(peaks, names) if p is not None and not pd.isna(p)]
    text = f"{len(names)} runs"
    if known:
        top, name = max(known, key=lambda t: t[0])
        low, low_name = min(known, key=lambda t: t[0])
        text += (
            f"; the largest peak is {name}'s {human_bytes(int(top))}, the smallest {low_name}'s {human_bytes(int(low))}"
        )
    text += "."
    if unreadable:
        text += f" {unreadable} could not be read (below, one line each)."
    return text


def estimate(measured: int | None, predicted: int | None) -> str:
    """The analytic model's total against the measured peak."""
    if not measured or predicted is None:
        return "No prediction to set against this run."
    off = (predicted - measured) / measured * 100
    return (
        f"The analytic model predicts {human_bytes(predicted)} at the peak against {human_bytes(measured)} measured "
        f"({off:+.1f}%)."
    )


def fragmentation(at_peak: dict) -> str:
    """What the allocator held beyond the tensors at the peak (fragmentation.fragmentation_at_peak)."""
    reserved = at_peak.get("reserved_bytes")
    if reserved is None:
        return "The CPU backend has no allocator segments: nothing fragments."
    slack = at_peak.get("reserved_minus_allocated_bytes") or 0
    return (
        f"At the peak the allocator reserved {human_bytes(reserved)}, {human_bytes(slack)} more than was allocated: "
        f"{human_bytes(at_peak.get('inactive_split_bytes') or 0)} of it in split blocks, the largest free block "
        f"{human_bytes(at_peak.get('largest_free_block_bytes') or 0)}."
    )
