"""Time fitting every few-bit table (all activations, bits 1..8) on one core.

Usage: python -m fewbit_fx.evidence.tables_timing
Prints the total time and rel_rmse = sqrt(mse / E_p[f'^2]) under N(0, 1) per activation and bits.
"""
import time

import torch

from fewbit_fx import activations, tables


def main() -> None:
    torch.set_num_threads(1)
    acts = [activations.get(name) for name in activations.SUPPORTED]
    tables.all_tables(activations.get("relu"), 1)  # warm torch up outside the timing
    tables._solve.cache_clear()
    tables._cell_moments.cache_clear()

    wall, cpu = time.perf_counter(), time.process_time()
    fitted = {}
    for act in acts:
        t = time.perf_counter()
        fitted[act] = (tables.all_tables(act), time.perf_counter() - t)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    bits = range(1, tables.MAX_BITS + 1)
    print(f"grid: {tables.GRID_CELLS} cells; {len(acts)} activations x bits 1..{tables.MAX_BITS}")
    print(f"total: {wall:.2f} s wall, {cpu:.2f} s CPU (1 thread)\n")
    print(f"{'activation':<32}" + "".join(f"{b:>9d}" for b in bits) + "   time/s")
    for act, (t, sec) in fitted.items():
        print(f"{str(act):<32}" + "".join(f"{t[b].rel_rmse:9.2e}" for b in bits) + f"{sec:9.2f}")


if __name__ == "__main__":
    main()
