"""Summarise a deploy/gpu/run.sh run: gpu.md and gpu.json from each precision's
`sluice bench batching` report and the nvidia-smi samples.

    python summarise.py --work DIR --device cuda --commit abc1234 --out DIR

DIR (--work) holds runs/<precision>/batching.json, phases ("<precision> start|end
<unix seconds> [exit status]" lines) and, on a GPU, gpu.txt and smi.csv
(timestamp, memory.used MiB, utilization.gpu %, sampled every 250 ms).
"""

import argparse
import datetime
import json
import os


def read_phases(path):
    phases = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                entry = phases.setdefault(parts[0], {})
                entry[parts[1]] = float(parts[2])
                if parts[1] == "end" and len(parts) > 3:
                    entry["exit"] = int(parts[3])
    return phases


def read_smi(path):
    samples = []
    if not os.path.exists(path):
        return samples
    with open(path) as f:
        for line in f:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                continue
            try:
                when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                samples.append((when, float(parts[1]), float(parts[2])))
            except ValueError:
                continue
    return samples


def gpu_use(samples, start, end):
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return None
    busy = [s[2] for s in inside]
    return {
        "samples": len(inside),
        "memory_used_mib_max": max(s[1] for s in inside),
        "utilization_pct_mean": sum(busy) / len(busy),
        "utilization_pct_max": max(busy),
    }


def cell(point):
    if point is None:
        return ""
    runs = point.get("runs") or [point["events_per_s"]]
    if len(runs) > 1:
        return f"{point['events_per_s']:.0f} ({min(runs):.0f}–{max(runs):.0f})"
    return f"{point['events_per_s']:.0f}"


def at(points, size):
    return next((p for p in points if p["batch_size"] == size), None)


def ratio(a, b):
    return f"{a['events_per_s'] / b['events_per_s']:.2f}" if a and b and b["events_per_s"] else ""


def precision_markdown(name, report, use, exit_status):
    md = [f"\n## {name}\n"]
    md.append(
        f"The model on {report['device']} in {report['precision']}; {report['events_per_point']} events per point, "
        f"median of {report['repeats']} runs (lowest–highest); `sluice bench batching` exit status {exit_status}.\n"
    )
    if use:
        md.append(
            f"GPU during this precision's runs: memory used at most {use['memory_used_mib_max']:.0f} MiB, "
            f"utilisation {use['utilization_pct_mean']:.0f}% on average, {use['utilization_pct_max']:.0f}% at most "
            f"({use['samples']} samples).\n"
        )
    md.append("| batch size | raw model | inferrer, in memory | inferrer through the broker | four-stage pipeline "
              "| inferrer ÷ raw | pipeline ÷ raw | raw call p50 / p99 (ms) |")
    md.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for raw in report["raw_model"]:
        size = raw["batch_size"]
        broker, pipeline = at(report["inferrer_through_broker"], size), at(report["pipeline"], size)
        call = raw.get("call_ms") or {}
        md.append(
            f"| {size} | {cell(raw)} | {cell(at(report['inferrer_in_memory'], size))} | {cell(broker)} | "
            f"{cell(pipeline)} | {ratio(broker, raw)} | {ratio(pipeline, raw)} | "
            f"{call.get('p50', 0):.2f} / {call.get('p99', 0):.2f} |"
        )
    light = report.get("light_model")
    if light:
        md.append("\nThe near-free `stock-light` model (the serving path's own cost); inferrer CPU per event "
                  "through the broker, µs:\n")
        md.append("| batch size | raw model | inferrer, in memory | inferrer through the broker | "
                  "CPU µs/event | Kafka client | model | the rest |")
        md.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for raw in light["raw_model"]:
            size = raw["batch_size"]
            broker = at(light["inferrer_through_broker"], size)
            inferrer = next((p for p in (broker or {}).get("processes", []) if p["name"] == "inferrer"), None)
            split = (
                f"{inferrer['cpu_ms_per_1000_events']:.1f} | {inferrer['kafka_client_ms_per_1000_events']:.1f} | "
                f"{inferrer['model_ms_per_1000_events']:.1f} | {inferrer['other_ms_per_1000_events']:.1f}"
                if inferrer else " | | | "
            )
            md.append(f"| {size} | {cell(raw)} | {cell(at(light['inferrer_in_memory'], size))} | {cell(broker)} | {split} |")
    return "\n".join(md) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    phases = read_phases(os.path.join(args.work, "phases"))
    samples = read_smi(os.path.join(args.work, "smi.csv"))
    gpu = ""
    if os.path.exists(os.path.join(args.work, "gpu.txt")):
        with open(os.path.join(args.work, "gpu.txt")) as f:
            gpu = f.read().strip()
    summary = {
        "measured_on": datetime.date.today().isoformat(),
        "commit": args.commit,
        "device": args.device,
        "gpu": gpu,
        "precisions": {},
    }
    md = [
        "# Batching on a GPU",
        "",
        f"Written by `deploy/gpu/run.sh --device {args.device}` on {summary['measured_on']} "
        f"(bundle of commit {args.commit}; {gpu or 'no GPU: the CPU rehearsal'}). Each precision is one "
        "`sluice bench batching` run with the model on the device; the broker (tansu, on loopback) and the "
        "stages run on the machine's CPU cores. Raw figures: [gpu.json](gpu.json).",
    ]
    for name, phase in phases.items():
        path = os.path.join(args.work, "runs", name, "batching.json")
        exit_status = phase.get("exit", "unknown")
        if not os.path.exists(path):
            md.append(f"\n## {name}\n\nNo report: `sluice bench batching` exited with {exit_status} before writing one "
                      "(see run.log).\n")
            summary["precisions"][name] = {"exit": exit_status}
            continue
        with open(path) as f:
            report = json.load(f)
        use = gpu_use(samples, phase.get("start", 0), phase.get("end", 0)) if samples else None
        summary["precisions"][name] = {"exit": exit_status, "gpu": use, "report": report}
        md.append(precision_markdown(name, report, use, exit_status))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"summarised {', '.join(summary['precisions'])} into {args.out}")


if __name__ == "__main__":
    main()
