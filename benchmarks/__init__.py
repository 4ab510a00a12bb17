"""GPU benchmarks and their raw results (`results/`); what they measured is in BENCHMARKS.md."""
