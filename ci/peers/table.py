#!/usr/bin/env python3
"""One table from `dbrx bench --json` and `peers.py --json`: ours / floor / peer, as markdown.
Usage: table.py BENCH_JSON PEERS_JSON"""
import json
import sys


def main():
    ours = json.load(open(sys.argv[1]))
    peers = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {"rows": []}
    by_name = {}
    for p in peers["rows"]:
        if p["ms"] is not None:
            by_name.setdefault(p["name"], []).append(p)
    print(f"Device: {ours['device']}; measured HBM read {ours['read_tb_s']:.2f} TB/s, "
          f"bf16 GEMM {ours['gemm_tflop_s']:.0f} TFLOP/s; synthetic DBRX, {ours['layers']} layers; "
          f"torch {peers.get('torch', '?')}\n")
    print("| figure | ours ms | floor ms | floor/ours | floor basis | peer | peer ms | peer/ours | ours achieved |")
    print("|---|---:|---:|---:|---|---|---:|---:|---|")
    seen = set()
    for r in ours["rows"]:
        seen.add(r["name"])
        ps = by_name.get(r["name"]) or [None]
        for i, p in enumerate(ps):
            head = (f"| {r['name']} | {r['ours_ms']:.4f} | {r['floor_ms']:.4f} | {r['floor_ms'] / r['ours_ms']:.3f} "
                    f"| {r['basis']} ") if i == 0 else "| | | | | "
            peer = (f"| {p['peer']} | {p['ms']:.4f} | {p['ms'] / r['ours_ms']:.2f} ") if p else "| - | - | - "
            print(head + peer + f"| {r['extra'] if i == 0 else ''} |")
    for name, ps in by_name.items():
        if name not in seen:
            for p in ps:
                print(f"| {name} | - | - | - | - | {p['peer']} | {p['ms']:.4f} | - | |")
    failed = [p for p in peers["rows"] if p["ms"] is None]
    for p in failed:
        print(f"\nPeer not measured: {p['name']} / {p['peer']}: {p['note']}")


if __name__ == "__main__":
    main()
