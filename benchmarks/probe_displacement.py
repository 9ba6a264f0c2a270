"""How far a study run's training moved each part of the network: ||theta - theta_start|| / ||theta_start||.

    python benchmarks/probe_displacement.py KEY [KEY ...]     # study run keys (docs/study/runs/KEY.json)

theta_start is the run's parent's weights (a TMD stage 2: its stage 1) or, without a parent, the world teacher
(DMD2-v and stage 1 start from it). Weights are the exported EMA generators in runs/study/KEY/student.safetensors.
Parts: the transformer's blocks, its embedders and output, and (TMD) the inner-state block, fusion and gap
embedder; parts new in the student are left out when measured against the teacher. Prints one line per run and
writes runs/probe/displacement.json. docs/results.md compares TMD's stage 2 with DMD2-v over the same updates.
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from safetensors.torch import load_file

from tmd.world.data import WorldAssets

PART = re.compile(r"(?:transformer\.)?(blocks\.\d+|[a-z_]+)")


def displacement(weights: dict, start: dict) -> dict[str, float]:
    moved, size = defaultdict(float), defaultdict(float)
    for name, value in weights.items():
        if name not in start:
            continue
        part = PART.match(name).group(1)
        moved[part] += (value.double() - start[name].double()).pow(2).sum().item()
        size[part] += start[name].double().pow(2).sum().item()
    return {part: (moved[part] / size[part]) ** 0.5 for part in sorted(moved) if size[part] > 0}


def main(keys: list[str]) -> None:
    teacher = WorldAssets().teacher.state_dict()
    results = []
    for key in keys:
        record = json.loads(Path(f"docs/study/runs/{key}.json").read_text())
        weights = load_file(f"runs/study/{key}/student.safetensors")
        parent = record.get("parent")
        start = load_file(f"runs/study/{parent}/student.safetensors") if parent else teacher
        result = {"run": key, "name": record["name"], "seed": record["seed"], "from": parent or "teacher"}
        result["displacement"] = displacement(weights, start)
        results.append(result)
        print(record["name"], record["seed"], {k: round(v, 4) for k, v in result["displacement"].items()}, flush=True)
    out = Path("runs/probe/displacement.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
