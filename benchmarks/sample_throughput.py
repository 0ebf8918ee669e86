"""Sampling throughput, ddpm_fast against diffusers and stock PyTorch: the entry point in a source
checkout. The benchmark itself is ddpm_fast/bench.py (also `ddpm-fast bench` from an installed
package); run this way, results go to benchmarks/results/ by default.

    python benchmarks/sample_throughput.py --device cuda --batch 1 64 256
    python benchmarks/sample_throughput.py --device cpu --batch 8 --steps 10
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's ddpm_fast
# the benchmark scripts beside this one import these from here
from ddpm_fast.bench import environment, main, write_json  # noqa: E402, F401

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    sys.exit(main(results_dir=RESULTS, prog="benchmarks/sample_throughput.py"))
